"""Rewrite dequantize -> conv2d [-> + bias] [-> relu] -> quantize: an integer conv2d with a requantize tail.

    x_q --dequantize(s_x, zp_x)--\
    W_q --dequantize(s_w, 0, axis 0)-- conv2d -- add(reshape(dequantize(B_q, s_x*s_w)))
        -- [relu] -- quantize(s_y, zp_y)
=>
    pad(x_q, value=zp_x) -- conv2d(int8 W_q, out int32) -- + (B_q - zp_x * sum(W_q))
        -- requantize(s_x*s_w/s_y)

Padding with the input zero point makes padded taps contribute (zp_x - zp_x) * w = 0, as zeros do in float, so
the zero point folds exactly into the bias. A ReLU folds into the lower clip bound (quantize is monotone and
quantize(0) = zp_y). The rewriter returns the expression unchanged whenever a precondition fails; the
caller reports any float conv2d left behind.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import Multiplier, const_np, folded_bias, qtype_of, requantize, scalar
from .rewrite_registry import register_rewrite

__all__ = ["ConvRewrite"]


@register_rewrite("conv2d", phase="compute", order=10)
class ConvRewrite:
    """Pattern and rewriter for one quantized NCHW conv2d; `requant` is "float" or "fixed"."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.x_q, self.s_x, self.zp_x = wildcard(), is_const(), is_const()
        self.w_q, self.s_w, self.zp_w = is_const(), is_const(), is_const()
        self.b_q, self.s_b, self.zp_b = is_const(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        x = is_op("relax.dequantize")(self.x_q, self.s_x, self.zp_x)
        self.w = is_op("relax.dequantize")(self.w_q, self.s_w, self.zp_w)
        self.conv = is_op("relax.nn.conv2d")(x, self.w)
        b = is_op("relax.dequantize")(self.b_q, self.s_b, self.zp_b)
        b = is_op("relax.reshape")(b, wildcard()) | b
        biased = is_op("relax.add")(self.conv, b) | is_op("relax.add")(b, self.conv)
        self.relu = is_op("relax.nn.relu")(biased | self.conv)
        self.quant = is_op("relax.quantize")(self.relu | biased | self.conv, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        conv_attrs = m[self.conv].attrs
        if conv_attrs.data_layout != "NCHW" or conv_attrs.kernel_layout != "OIHW":
            return expr
        x_q = m[self.x_q]
        in_t = qtype_of(x_q.ty.dtype)
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        w = const_np(m[self.w_q])
        s_x, zp_x, s_y, zp_y = (scalar(m[p]) for p in (self.s_x, self.zp_x, self.s_y, self.zp_y))
        if in_t is None or out_t is None or None in (s_x, zp_x, s_y, zp_y) or w.dtype != np.int8:
            return expr
        cout = w.shape[0]
        s_w = np.broadcast_to(const_np(m[self.s_w]).astype(np.float32).reshape(-1), (cout,))
        zp_w = const_np(m[self.zp_w])
        w_axis = int(m[self.w].attrs.axis)
        if np.any(zp_w != 0) or (const_np(m[self.s_w]).size > 1 and w_axis != 0):
            return expr  # asymmetric or non-output-channel weights: not lowered (reported as a float island)

        bias_q = None
        if self.b_q in m:
            bias_q = (const_np(m[self.b_q]), const_np(m[self.s_b]), const_np(m[self.zp_b]))
        folded = folded_bias(w, 0, in_t, int(zp_x), s_x, s_w, bias_q)
        if folded is None:
            return expr
        bias, bound = folded

        data, padding = x_q, [int(p) for p in conv_attrs.padding]
        if int(zp_x) != 0 and any(padding):
            t, left, btm, r = padding  # relax conv2d padding is (top, left, bottom, right)
            data = relax.op.nn.pad(x_q, [0, 0, 0, 0, t, btm, left, r], pad_value=float(zp_x))
            padding = [0, 0, 0, 0]
        acc = relax.op.nn.conv2d(
            data, relax.const(w), strides=conv_attrs.strides, padding=padding, dilation=conv_attrs.dilation,
            groups=int(conv_attrs.groups), out_dtype="int32",
        )
        acc = relax.op.add(acc, relax.const(bias.astype(np.int32).reshape(1, cout, 1, 1)))
        lo = max(out_t.qmin, int(zp_y)) if self.relu in m else out_t.qmin
        mult = Multiplier.for_product(s_x, s_w, s_y)
        return requantize(acc, mult, int(zp_y), out_t, lo, (1, cout, 1, 1), self.requant, bound)
