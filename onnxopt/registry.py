"""The pass base class and the catalogue of passes by kebab-case name.

A pass is an ``onnx_ir`` in-place pass with a dataclass ``Config``. The catalogue lets recipes name
passes and options as plain data (TOML, JSON, dict), and validates them with one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.metrics import EXACT, Budget


@dataclasses.dataclass
class PassContext:
    """What the pipeline hands every pass besides the model.

    ``calibration``: representative input batches (for quantization, pruning refits).
    ``evaluation``: ``(feeds, labels)`` for accuracy-aware passes, labels may be ``None``.
    ``verify_feeds``: the seeded inputs the pipeline verifies on (always at least one batch).
    ``isa``: the CPU instruction set the model is optimized for (``optimize --target``, a name
    of :data:`onnxopt.isa.TARGETS`); ``None``: this machine's. Not the machine a benchmark runs
    on (``bench --target``, :mod:`onnxopt.targets`). ``target=`` is accepted as its old name.
    ``max_memory``: the user's memory budget in bytes (``--max-memory``), for passes that run
    the model on many samples at once.
    ``provenance``: the metadata the pipeline stamps into the output model after the last pass;
    a pass that holds the file to a size target measures its candidates with it.
    ``threads``: the intra-op thread counts the model is deployed at (``--threads``), which
    latency decisions are made at; ``None``: 1 and every usable core
    (:func:`onnxopt.passes._shared.timing.deploy_threads`).
    """

    calibration: list[dict[str, np.ndarray]] | None = None
    evaluation: tuple[dict[str, np.ndarray], np.ndarray | None] | None = None
    verify_feeds: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    seed: int = 0
    isa: str | None = None
    max_memory: int | None = None
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)
    threads: list[int] | None = None
    target: dataclasses.InitVar[str | None] = None  # the old name of ``isa``

    def __post_init__(self, target: str | None) -> None:
        if target is not None:
            if self.isa not in (None, target):
                raise ValueError(f"PassContext: isa={self.isa!r} and target={target!r} disagree")
            self.isa = target


# Read access by the old name too (the class attribute the InitVar default left is replaced).
PassContext.target = property(lambda self: self.isa,  # type: ignore[assignment,misc]
                              doc="The old name of ``isa`` (read-only).")


@dataclasses.dataclass
class EmptyConfig:
    """A pass without options."""


class OptPass(ir.passes.InPlacePass):
    """Base of every onnxopt pass: a named, configurable, verifiable in-place ``onnx_ir`` pass.

    Subclasses set ``name``, ``summary`` and ``Config``, implement ``call()``, and override
    ``budget()`` when the pass is lossy. ``self.notes`` (plain data) lands in the pass's report record.

    The contract (the pipeline and its instruments rely on it, not on an order of calls):

    - The pipeline builds one instance per step and calls it once, on the model to rewrite;
      ``call()`` works in place and returns ``PassResult(model, modified)``. A pass that misses
      a budget of its own leaves its best candidate in the model and raises
      :class:`~onnxopt.errors.QualityGateError`.
    - ``budget()`` depends on ``config`` and ``context`` only: it may be called at any time,
      before or after ``call()``, any number of times, and gives the same answer. (The
      pipeline verifies with it after ``call()``; nothing a call found may widen it.)
    - On ``self`` a pass keeps ``config`` and ``context`` (both read-only) and ``notes``
      (written by ``call()``, read by the pipeline afterwards). The working state of a call
      (data chosen for fitting, sets of nodes) lives in locals and arguments, never in
      attributes of the instance or the class.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig
    # The report marks models that need ONNX Runtime's contrib ops after this pass.
    needs_onnxruntime: ClassVar[bool] = False

    def __init__(self, config: Any | None = None, context: PassContext | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context or PassContext()
        self.notes: dict[str, Any] = {}

    def budget(self) -> Budget:
        """How far this pass may move the outputs of the model it receives."""
        return EXACT


PASSES: dict[str, type[OptPass]] = {}


def register(cls: type[OptPass]) -> type[OptPass]:
    """Class decorator adding a pass to the catalogue under its ``name``."""
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"two passes named '{cls.name}'")
    PASSES[cls.name] = cls
    return cls


def catalogue() -> dict[str, type[OptPass]]:
    """Every registered pass (importing ``onnxopt.passes`` registers them)."""
    import onnxopt.passes  # noqa: F401

    return dict(sorted(PASSES.items()))


def pass_class(name: str) -> type[OptPass]:
    """The pass registered as ``name``, or an :class:`InputError` listing the known ones."""
    passes = catalogue()
    if name not in passes:
        raise InputError(f"unknown pass '{name}' (known: {', '.join(passes)})")
    return passes[name]


def make_config(cls: type[OptPass], options: Mapping[str, Any]) -> Any:
    """Build ``cls.Config`` from plain data, checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    hints = typing.get_type_hints(cls.Config)
    values = {}
    for key, value in options.items():
        field_name = key.replace("-", "_")
        if field_name not in fields:
            known = ", ".join(fields) or "none"
            raise InputError(f"pass '{cls.name}' has no option '{key}' (options: {known})")
        values[field_name] = _coerce(cls.name, key, value, hints[field_name])
        _check_range(cls.name, key, values[field_name], fields[field_name].metadata)
    try:
        return cls.Config(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"pass '{cls.name}': {exc}") from exc


def config_fields(cls: type[OptPass]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) of each option, for ``list-passes`` and the README."""
    hints = typing.get_type_hints(cls.Config)
    rows = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def option(default: Any, help: str, *, min: float | None = None,  # noqa: A002
           max: float | None = None) -> Any:  # noqa: A002
    """A dataclass field with a description that doubles as CLI and README help.

    ``min``/``max`` bound a numeric option (inclusive); without ``min`` a number must still be
    finite and not negative (no count, fraction, budget or tolerance here means anything below 0).
    """
    metadata = {"help": help, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_range(pass_name: str, key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    """Reliability: NaN, infinities and out-of-range numbers are refused naming the option,
    before a pass runs on them (``candidates = -3`` would search nothing, NaN compares false)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low = metadata.get("min")
    low = 0 if low is None else low
    high = metadata.get("max")
    problem = None
    if not math.isfinite(value):
        problem = "a finite number"
    elif value < low or (high is not None and value > high):
        problem = f"a number in [{low:g}, {high:g}]" if high is not None else f"a number >= {low:g}"
    if problem is not None:
        raise InputError(f"pass '{pass_name}' option '{key}' expects {problem}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(pass_name: str, key: str, value: Any, tp: Any) -> Any:
    """Accept the value when it fits the annotated type (ints for floats too); else a clear error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    ok: bool
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for arg in args:
            try:
                return _coerce(pass_name, key, value, arg)
            except InputError:
                continue
        ok = False
    elif origin is typing.Literal:
        ok = value in args
    elif origin in (list, tuple) or tp in (list, tuple):
        ok = isinstance(value, (list, tuple))
        if ok:
            return list(value)
    elif origin is dict or tp is dict:
        ok = isinstance(value, Mapping)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is type(None):
        ok = value is None
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise InputError(f"pass '{pass_name}' option '{key}' expects {_type_name(tp)}, got {value!r}")
    return value


def describe_passes(names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Plain-data description of passes, for ``onnxopt list-passes --json``."""
    passes = catalogue()
    return [
        {
            "name": name,
            "summary": cls.summary,
            "options": [
                {"name": n, "type": t, "default": d, "help": h} for n, t, d, h in config_fields(cls)
            ],
        }
        for name, cls in passes.items()
        if names is None or name in names
    ]
