"""Fidelity metrics between a reference output and a candidate output, and error budgets.

A :class:`Budget` is what a pass declares: how far its outputs may move from those of the model it
received. Semantics-preserving passes use ``allclose`` at fp32 tolerances; lossy ones a cosine or
SQNR floor.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def max_abs_error(ref: np.ndarray, out: np.ndarray) -> float:
    """Largest absolute difference."""
    if ref.size == 0:
        return 0.0
    return float(np.max(np.abs(_flat(ref) - _flat(out))))


def max_rel_error(ref: np.ndarray, out: np.ndarray, eps: float = 1e-6) -> float:
    """Largest difference relative to the reference's magnitude (floored by ``eps``)."""
    if ref.size == 0:
        return 0.0
    r = _flat(ref)
    return float(np.max(np.abs(r - _flat(out)) / np.maximum(np.abs(r), eps)))


def cosine_similarity(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine of the angle between the two outputs flattened; 1.0 when both are zero."""
    r, o = _flat(ref), _flat(out)
    nr, no = np.linalg.norm(r), np.linalg.norm(o)
    if nr == 0 and no == 0:
        return 1.0
    if nr == 0 or no == 0:
        return 0.0
    return float(np.dot(r, o) / (nr * no))


def sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``out`` against the same row of ``ref`` (samples x features): 1 where
    both rows are zero, 0 where only one is (an output that became zeros has changed).

    :func:`cosine_similarity` is the cosine of whole tensors (the pipeline's budgets); this one is
    per sample, for accuracy scores (:mod:`onnxopt.passes._shared.scoring`).
    """
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na == 0) & (nb == 0), 1.0,
                    (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300))


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (infinite when identical)."""
    r, o = _flat(ref), _flat(out)
    noise = float(np.sum((r - o) ** 2))
    if noise == 0.0:
        return float("inf")
    signal = float(np.sum(r**2))
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Every metric at once, for reports."""
    if np.asarray(ref).dtype.kind not in "fc":  # integer/bool outputs must match exactly
        equal = bool(np.array_equal(ref, out))
        return {"max_abs": 0.0 if equal else float("inf"), "max_rel": 0.0 if equal else float("inf"),
                "cosine": 1.0 if equal else 0.0, "sqnr_db": float("inf") if equal else 0.0}
    return {
        "max_abs": max_abs_error(ref, out),
        "max_rel": max_rel_error(ref, out),
        "cosine": cosine_similarity(ref, out),
        "sqnr_db": sqnr_db(ref, out),
    }


@dataclasses.dataclass(frozen=True)
class Budget:
    """How far a pass may move outputs.

    ``kind="allclose"``: ``|out - ref| <= atol + rtol * |ref|`` everywhere (numpy's allclose).
    ``kind="cosine"``: cosine similarity of every output at least ``min_value``.
    ``kind="sqnr"``: SQNR of every output at least ``min_value`` dB.
    ``kind="none"``: not checked (the pass is checked by its own accuracy search instead).
    """

    kind: Literal["allclose", "cosine", "sqnr", "none"] = "allclose"
    rtol: float = 1e-4
    atol: float = 1e-5
    min_value: float = 0.0

    def check(self, ref: np.ndarray, out: np.ndarray) -> str | None:
        """``None`` when within budget, else a one-line description of the breach."""
        if ref.shape != out.shape:
            return f"shape changed from {list(ref.shape)} to {list(out.shape)}"
        if self.kind == "none":
            return None
        if np.asarray(ref).dtype.kind not in "fc":
            return None if np.array_equal(ref, out) else "integer output changed"
        if self.kind == "allclose":
            r, o = _flat(ref), _flat(out)
            if np.allclose(o, r, rtol=self.rtol, atol=self.atol, equal_nan=True):
                return None
            return (f"max abs error {max_abs_error(ref, out):.3g}, max rel error "
                    f"{max_rel_error(ref, out):.3g} (allowed rtol={self.rtol:g}, atol={self.atol:g})")
        if self.kind == "cosine":
            value = cosine_similarity(ref, out)
            return None if value >= self.min_value else f"cosine {value:.5f} < {self.min_value:g}"
        value = sqnr_db(ref, out)
        return None if value >= self.min_value else f"SQNR {value:.2f} dB < {self.min_value:g} dB"

    @classmethod
    def cosine_floor(cls, min_cosine: float) -> Budget:
        """A cosine budget, or none when ``min_cosine`` is 0 (a lossy pass's user opted out)."""
        return cls("cosine", min_value=min_cosine) if min_cosine > 0 else cls("none")

    def describe(self) -> str:
        if self.kind == "allclose":
            return f"allclose(rtol={self.rtol:g}, atol={self.atol:g})"
        if self.kind == "none":
            return "unchecked"
        return f"{self.kind} >= {self.min_value:g}"


EXACT = Budget("allclose", rtol=1e-4, atol=1e-5)
