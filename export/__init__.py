"""Export stage: post-training quantization (calibration, learned rounding, BN folding) of a model into the
fake-quant reference, the QDQ ONNX graph written from it, and its check on onnxruntime.

    >>> from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
    >>> ref = quantize_model(model, calib_batches, QuantConfig.from_bits("W4A8", rounding="adaround"))
    >>> onnx.save(to_qdq_onnx(ref), "model_qdq.onnx")

The reference itself (graph capture, the op table, the integer numerics) lives in the core (plateau.capture,
plateau.ops, plateau.reference): training uses it too. The CLI (`plateau export`) calls `add_arguments(parser)`
and `main(args)`.
"""

from plateau.capture import capture
from plateau.qconfig import QuantConfig
from plateau.qgraph import QGraph
from plateau.reference import FakeQuantModel

from .onnx_writer import to_float_onnx, to_qdq_onnx
from .ptq import quantize_graph, quantize_model
from .reference_file import load_reference
from .stage import add_arguments, export_model, main

__all__ = [
    "QuantConfig",
    "QGraph",
    "capture",
    "FakeQuantModel",
    "quantize_model",
    "quantize_graph",
    "to_qdq_onnx",
    "to_float_onnx",
    "export_model",
    "load_reference",
    "add_arguments",
    "main",
]
