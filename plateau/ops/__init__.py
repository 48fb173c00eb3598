"""The op table: one entry per op kind of the integer path (see base.Op for what an entry answers).

    >>> from plateau.ops import OPS
    >>> OPS.get("conv").to_onnx(builder, node, ["x"], "y", "w", "b")
    >>> OPS.names()
    ('conv', 'linear', 'add', 'mul', 'cat', 'gap', 'avgpool', 'maxpool', 'identity', 'relu', 'flatten', ...)

Adding an op: a subclass of `Op` decorated with `@register_op` in one of these modules (or a new one imported
here); capture, the reference, the QDQ writer and the ONNX reader find it in the table. Float islands are entries
of `FLOAT_KINDS` (float_island.py).
"""

from plateau.qgraph import OPS

from . import (  # noqa: F401  (each registers its ops)
    const,
    elementwise,
    exact_islands,
    float_island,
    integer_only,
    island_forms,
    layers,
    layout,
    matmul,
    passthrough,
    pooling,
)
from .base import OnnxBuilder, OnnxNode, Op, clip_range, register_op
from .float_island import FLOAT_KINDS, float_kind_of_call, float_kind_of_module, run_float_kind

__all__ = ["OPS", "Op", "register_op", "OnnxBuilder", "OnnxNode", "clip_range", "FLOAT_KINDS",
           "float_kind_of_module", "float_kind_of_call", "run_float_kind"]
