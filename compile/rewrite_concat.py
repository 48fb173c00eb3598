"""Rewrite a quantized Concat into a concat of integers, each input brought to the output's parameters first.

    quantize(concat([dequantize(q_1, s_1, zp_1), ..., dequantize(q_n, s_n, zp_n)], axis), s_y, zp_y)
=>
    concat([requant(q_1), ..., requant(q_n)], axis)      requant(q_i) = q_i when (s_i, zp_i) == (s_y, zp_y)

Concat moves values without changing them, so quantizing the concatenation is quantizing each part: the
per-input requantize (rewrite_requant's float32 formula) is exact, and free when the exporter shares one scale
(as onnxruntime's quantizer does for Concat). Per-tensor parameters, 2 to MAX_INPUTS inputs.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple, wildcard

from ._common import per_tensor, qtype_of, requantize_elementwise
from .rewrite_registry import register_rewrite

__all__ = ["ConcatRewrite", "MAX_INPUTS"]

MAX_INPUTS = 8


@register_rewrite("concat", phase="compute", order=70)
class ConcatRewrite:
    """Pattern and rewriter for concat of per-tensor dequantized tensors followed by a per-tensor quantize."""

    def __init__(self, requant: str = "float") -> None:
        del requant  # exact in every mode
        self.s_y, self.zp_y = is_const(), is_const()
        self.parts = [(wildcard(), is_const(), is_const()) for _ in range(MAX_INPUTS)]
        deqs = [is_op("relax.dequantize")(*p) for p in self.parts]
        self.concats = [is_op("relax.concat")(is_tuple(deqs[:n])) for n in range(2, MAX_INPUTS + 1)]
        cat = self.concats[0]
        for c in self.concats[1:]:
            cat = cat | c
        self.quant = is_op("relax.quantize")(cat, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        dst = per_tensor(m[self.s_y], m[self.zp_y])
        cat = next(m[c] for c in self.concats if c in m)
        if out_t is None or dst is None:
            return expr
        ints = []
        for x_q, s, zp in self.parts[: len(cat.args[0].fields)]:
            src = per_tensor(m[s], m[zp])
            if src is None or qtype_of(m[x_q].ty.dtype) is None:
                return expr
            ints.append(requantize_elementwise(m[x_q], src, dst, out_t))
        return relax.op.concat(ints, axis=cat.attrs.axis)
