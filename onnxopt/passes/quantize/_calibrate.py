"""Calibrate: the value range of every float tensor, as plain data that can be saved and reused.

ORT's calibrators (MinMax, Entropy, Percentile) do the statistics; this module feeds them one batch
per ``collect_data`` call, so memory stays at one batch of activations (the histogram calibrators
otherwise hold every batch's tensors until the end), and never uses ``CalibMaxIntermediateOutputs``
(which silently drops batches). The result, a :class:`CalibrationTable`, is a JSON document;
converting the same prepared model with the same table gives the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import TensorData, TensorsData

from onnxopt.errors import InputError
from onnxopt.feeds import Feeds
from onnxopt.model_io import write_bytes_atomic

TABLE_FORMAT = "onnxopt.calibration-table"
TABLE_VERSION = 1
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


@dataclasses.dataclass(frozen=True)
class CalibrationTable:
    """``ranges[tensor] = (lowest, highest)`` seen on ``samples`` calibration samples."""

    method: str
    ranges: Mapping[str, tuple[float, float]]
    samples: int
    percentile: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "method": self.method,
                "percentile": self.percentile, "samples": self.samples,
                "ranges": {k: [_json_float(lo), _json_float(hi)]
                           for k, (lo, hi) in sorted(self.ranges.items())}}

    def save(self, path: str | Path) -> Path:
        return write_bytes_atomic(json.dumps(self.to_dict(), indent=1).encode(), path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"not a readable calibration table ({exc})", path) from exc
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise InputError(f"not an onnxopt calibration table (no format '{TABLE_FORMAT}')", path)
        if data.get("version") != TABLE_VERSION or data.get("method") not in METHODS:
            raise InputError(f"unsupported calibration table version/method "
                             f"({data.get('version')}, {data.get('method')})", path)
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
        return cls(data["method"], ranges, int(data.get("samples", 0)), data.get("percentile"))

    def check_covers(self, tensors: Iterable[str], path: str | Path | None) -> None:
        """An :class:`InputError` when the table was made for another model."""
        missing = sorted(set(tensors) - set(self.ranges))
        if missing:
            raise InputError(
                f"calibration table lacks {len(missing)} tensor(s) of this model (e.g. "
                f"{', '.join(missing[:3])}); it was made for another model or recipe", path)

    def to_ort(self) -> TensorsData:
        """A fresh ORT ``TensorsData`` (the quantizer edits the one it gets)."""
        return TensorsData(METHODS[self.method], {
            k: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
            for k, (lo, hi) in self.ranges.items()})


class OneBatch(CalibrationDataReader):
    """An ORT data reader over one feed batch."""

    def __init__(self, batch: Feeds) -> None:
        self._batch: Feeds | None = batch

    def get_next(self) -> Feeds | None:
        batch, self._batch = self._batch, None
        return batch


def calibrate(prepared_path: Path, batches: Iterable[Feeds], method: str, workdir: Path,
              percentile: float = 99.999) -> CalibrationTable:
    """Ranges of every float activation of the prepared model over all ``batches``."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["percentile"] = percentile
    calibrator = create_calibrator(
        prepared_path, augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=METHODS[method], extra_options=extra)
    samples = 0
    for batch in batches:
        with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print
            calibrator.collect_data(OneBatch(batch))
        samples += len(next(iter(batch.values()))) if batch else 0
    if samples == 0:
        raise InputError("calibration data holds no samples")
    with contextlib.redirect_stdout(io.StringIO()):
        computed = calibrator.compute_data()
    ranges = {name: (_scalar(td.range_value[0]), _scalar(td.range_value[1]))
              for name, td in computed.items()}
    return CalibrationTable(method, ranges, samples,
                            percentile if method == "percentile" else None)


def float_activations(proto: onnx.ModelProto) -> list[str]:
    """Names of the float tensors a calibration table must cover (graph inputs and node outputs)."""
    inits = {t.name for t in proto.graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]}
    names = [i.name for i in proto.graph.input if i.name not in inits]
    names += [o for node in proto.graph.node for o in node.output if o]
    return [n for n in names if types.get(n) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]


def _scalar(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def _json_float(x: float) -> float | str:
    """JSON has no infinities; a mask of float32 min is finite, but a user's -inf is not."""
    return x if math.isfinite(x) else str(x)
