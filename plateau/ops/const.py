"""Constant tensors the model adds or concatenates (a position embedding, a class token): a quantization point of
their own, always 8-bit, min-max over their values. In ONNX the integers are an initializer (no QuantizeLinear).

attrs: "value" (float32 tensor, batch dimension 1), "broadcast" (the model expands it along the batch).
"""

from __future__ import annotations

import numpy as np

from plateau.qgraph import ActQ
from plateau.quant import quantize

from .base import OnnxBuilder, Op, q, register_op

__all__ = ["Const"]


@register_op
class Const(Op):
    name = "const"
    writes_integers = True

    def run_float(self, n, ins, w, b):
        return n.attrs["value"]

    def run_int(self, n, ins, ain, a, w):
        return q(n.attrs["value"], a)

    def integers(self, n, a: ActQ) -> np.ndarray:
        return quantize(n.attrs["value"].detach(), np.float32(a.scale), a.zero_point, a.qtype).numpy()

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        """The float graph's constant (the QDQ graph writes its integers instead: Op.writes_integers)."""
        b.const_f32(out, n.attrs["value"].detach().numpy())

