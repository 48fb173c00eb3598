"""plateau.compile: QDQ ONNX -> integer TVM Relax -> shared library for a named target.

    >>> from plateau.compile import compile_onnx, list_targets, lower_qdq
    >>> manifest = compile_onnx("model_qdq.onnx", "arm64", "out/arm64")   # writes out/arm64/model.so
"""

from __future__ import annotations

from .compiler import compile_onnx
from .lower import lower_qdq, op_counts
from .targets import CompileTarget, get_target, list_targets, register_target

__all__ = ["compile_onnx", "list_targets", "lower_qdq", "get_target", "register_target", "CompileTarget",
           "op_counts"]
