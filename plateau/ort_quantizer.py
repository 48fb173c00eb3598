"""onnxruntime's own quantizer (quantize_static), the baseline Plateau's exports and kernels are compared with.

Used by `plateau bench`, the benchmarks under bench/ and the compile tests' fixtures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import atomic_path

__all__ = ["ort_quantize"]


class _Reader:
    """onnxruntime CalibrationDataReader over normalized images, `batch` images per call."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 1) -> None:
        self.x, self.name, self.batch, self.i = x, name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += self.batch
        return {self.name: self.x[self.i - self.batch:self.i]}

    def rewind(self) -> None:
        self.i = 0


_QUANT_TYPES = {"u8": "QUInt8", "s8": "QInt8", "u4": "QUInt4", "s4": "QInt4"}


def ort_quantize(fp32: Path, calib: np.ndarray, out: Path, fmt: str = "qdq", act: str = "u8",
                 weight: str = "s8", batch: int = 1) -> Path:
    """onnxruntime's own quantizer (quantize_static): fmt "qdq" | "qop", act and weight "u8" | "s8" | "u4" | "s4";
    weights per channel, min-max calibration on the images `calib`, fed `batch` at a time (the batch size moves
    onnxruntime's float activations, so its ranges, by an ulp). Written atomically to `out`."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with atomic_path(out) as tmp:
        tmp_onnx = tmp.with_suffix(".onnx")
        try:
            quantize_static(str(fp32), str(tmp_onnx), _Reader(calib, name, batch),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            activation_type=getattr(QuantType, _QUANT_TYPES[act]),
                            weight_type=getattr(QuantType, _QUANT_TYPES[weight]), per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax)
            tmp_onnx.replace(tmp)
        finally:
            tmp_onnx.unlink(missing_ok=True)
    return out
