"""Rewrite quantize(dequantize(x_q)) into integers: nothing when the parameters agree, else an elementwise
requant.

    quantize(dequantize(x_q, s1, zp1), s2, zp2)
=>
    x_q                                                        when (s1, zp1, dtype) == (s2, zp2, dtype)
    saturate(round_half_even(float32(x_q - zp1) * s1 / s2) + zp2)   otherwise (float32, the QDQ pair's order)

The first case is exact because |x_q - zp1| <= 255: float32((n * s) / s) rounds back to n. These pairs are
what exporters write around pass-through ops (Flatten, MaxPool, Reshape re-quantized with their input's
parameters); after rewrite_passthrough has moved the dequantize below such an op they meet and cancel.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import per_tensor, qtype_of, requantize_elementwise
from .rewrite_registry import register_rewrite

__all__ = ["RequantRewrite"]


@register_rewrite("requant", phase="pre", order=20)
class RequantRewrite:
    """Pattern and rewriter for a per-tensor dequantize directly followed by a per-tensor quantize."""

    def __init__(self, requant: str = "float") -> None:
        del requant  # same integers in every mode: the identity, or the pair's own float32 formula
        self.x_q = wildcard()
        self.s1, self.zp1, self.s2, self.zp2 = is_const(), is_const(), is_const(), is_const()
        self.deq = is_op("relax.dequantize")(self.x_q, self.s1, self.zp1)
        self.quant = is_op("relax.quantize")(self.deq, self.s2, self.zp2)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        x_q = m[self.x_q]
        src, dst = per_tensor(m[self.s1], m[self.zp1]), per_tensor(m[self.s2], m[self.zp2])
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        if src is None or dst is None or out_t is None or qtype_of(x_q.ty.dtype) is None:
            return expr
        return requantize_elementwise(x_q, src, dst, out_t)
