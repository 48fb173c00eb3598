"""Rewrite dequantize -> matmul [-> + bias] [-> relu] -> quantize: an integer matmul with a requantize tail.

Covers what the ONNX importer makes of a quantized Gemm (transB=1: permute_dims of the dequantized [out, in]
weight, per-channel axis 0) and of Gemm transB=0 / MatMul (weight [in, out], per-channel axis 1), with the
bias added on either side:

    matmul(dequantize(x_q), W) + dequantize(B_q)  -> quantize(s_y, zp_y)
=>
    matmul(x_q, W_q[in, out], out int32) + (B_q - zp_x * sum_k W_q[k, :]) -> requantize(s_x*s_w/s_y)

The weight is transposed once at compile time, so no permute runs on the device.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import Multiplier, const_np, folded_bias, qtype_of, requantize, scalar
from .rewrite_registry import register_rewrite

__all__ = ["MatmulRewrite"]


@register_rewrite("matmul", phase="compute", order=20)
class MatmulRewrite:
    """Pattern and rewriter for one quantized matmul with a constant 2-D weight."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.x_q, self.s_x, self.zp_x = wildcard(), is_const(), is_const()
        self.w_q, self.s_w, self.zp_w = is_const(), is_const(), is_const()
        self.b_q, self.s_b, self.zp_b = is_const(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        x = is_op("relax.dequantize")(self.x_q, self.s_x, self.zp_x)
        self.w = is_op("relax.dequantize")(self.w_q, self.s_w, self.zp_w)
        self.w_t = is_op("relax.permute_dims")(self.w)
        self.mm = is_op("relax.matmul")(x, self.w_t | self.w)
        b = is_op("relax.dequantize")(self.b_q, self.s_b, self.zp_b)
        biased = is_op("relax.add")(self.mm, b) | is_op("relax.add")(b, self.mm)
        self.relu = is_op("relax.nn.relu")(biased | self.mm)
        self.quant = is_op("relax.quantize")(self.relu | biased | self.mm, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        x_q = m[self.x_q]
        in_t = qtype_of(x_q.ty.dtype)
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        w = const_np(m[self.w_q])
        s_x, zp_x, s_y, zp_y = (scalar(m[p]) for p in (self.s_x, self.zp_x, self.s_y, self.zp_y))
        if in_t is None or out_t is None or None in (s_x, zp_x, s_y, zp_y):
            return expr
        if w.dtype != np.int8 or w.ndim != 2:
            return expr
        s_w_raw = const_np(m[self.s_w]).astype(np.float32).reshape(-1)
        if np.any(const_np(m[self.zp_w]) != 0):
            return expr
        # The per-channel axis must be the output axis: 0 of [out, in] transposed, else 1 of [in, out].
        transposed = self.w_t in m
        if transposed:
            perm = m[self.w_t].attrs.axes
            if perm is not None and [int(a) for a in perm] != [1, 0]:
                return expr
            w = w.T
        out_axis = 0 if transposed else 1
        if s_w_raw.size > 1 and int(m[self.w].attrs.axis) % 2 != out_axis:
            return expr
        cout = w.shape[1]
        s_w = np.broadcast_to(s_w_raw, (cout,))

        bias_q = None
        if self.b_q in m:
            bias_q = (const_np(m[self.b_q]), const_np(m[self.s_b]), const_np(m[self.zp_b]))
        folded = folded_bias(w, 1, in_t, int(zp_x), s_x, s_w, bias_q)
        if folded is None:
            return expr
        bias, bound = folded

        acc = relax.op.matmul(x_q, relax.const(np.ascontiguousarray(w)), out_dtype="int32")
        acc = relax.op.add(acc, relax.const(bias.astype(np.int32)))
        lo = max(out_t.qmin, int(zp_y)) if self.relu in m else out_t.qmin
        mult = Multiplier.for_product(s_x, s_w, s_y)
        return requantize(acc, mult, int(zp_y), out_t, lo, (cout,), self.requant, bound)
