"""Rewrite dequantize(A) @ dequantize(B) -> quantize, both operands activations (attention's Q.K^T and P.V),
into an integer batched matmul with a requantize tail.

    quantize(matmul(dequantize(a_q, s_a, zp_a), dequantize(b_q, s_b, zp_b)), s_y, zp_y)
=>
    requantize(matmul(int32(a_q) - zp_a, int32(b_q) - zp_b, out int32), s_a * s_b / s_y)

Per-tensor parameters on both sides (the QDQ form of onnxruntime's QLinearMatMul); the int32 accumulation is
exact, the requantize is the conv's. Leading (batch, head) axes broadcast as in ONNX MatMul.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import Multiplier, const_np, qtype_of, requantize, scalar
from .rewrite_registry import register_rewrite

__all__ = ["ActMatmulRewrite"]


@register_rewrite("act_matmul", phase="compute", order=30)
class ActMatmulRewrite:
    """Pattern and rewriter for a quantized matmul of two quantized activations."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.a_q, self.s_a, self.zp_a = wildcard(), is_const(), is_const()
        self.b_q, self.s_b, self.zp_b = wildcard(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        a = is_op("relax.dequantize")(self.a_q, self.s_a, self.zp_a)
        b = is_op("relax.dequantize")(self.b_q, self.s_b, self.zp_b)
        self.mm = is_op("relax.matmul")(a, b)
        self.quant = is_op("relax.quantize")(self.mm, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        a_q, b_q = m[self.a_q], m[self.b_q]
        if const_np(a_q) is not None or const_np(b_q) is not None:
            return expr  # a constant weight is MatmulRewrite's (per-channel scales, folded zero point)
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        params = [scalar(m[p]) for p in (self.s_a, self.zp_a, self.s_b, self.zp_b, self.s_y, self.zp_y)]
        if out_t is None or None in params or None in (qtype_of(a_q.ty.dtype), qtype_of(b_q.ty.dtype)):
            return expr
        s_a, zp_a, s_b, zp_b, s_y, zp_y = params
        op = relax.op
        centered = [op.subtract(op.astype(q, "int32"), relax.const(np.int32(zp), "int32"))
                    for q, zp in ((a_q, zp_a), (b_q, zp_b))]
        acc = op.matmul(*centered, out_dtype="int32")
        mult = Multiplier.for_product(s_a, np.float32(s_b), s_y)
        return requantize(acc, mult, int(zp_y), out_t, out_t.qmin, (), self.requant)
