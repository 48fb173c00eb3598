"""Export stage: calibration, learned rounding, BN folding, the fake-quant reference and the QDQ ONNX graph.

    >>> from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
    >>> ref = quantize_model(model, calib_batches, QuantConfig.from_bits("W4A8", rounding="adaround"))
    >>> onnx.save(to_qdq_onnx(ref), "model_qdq.onnx")

The CLI (`plateau export`) calls `add_arguments(parser)` and `main(args)`.
"""

from .config import QuantConfig
from .graph import QGraph, capture
from .onnx_writer import to_float_onnx, to_qdq_onnx
from .quantize import FakeQuantModel, quantize_model
from .stage import add_arguments, export_model, load_reference, main

__all__ = [
    "QuantConfig",
    "QGraph",
    "capture",
    "FakeQuantModel",
    "quantize_model",
    "to_qdq_onnx",
    "to_float_onnx",
    "export_model",
    "load_reference",
    "add_arguments",
    "main",
]
