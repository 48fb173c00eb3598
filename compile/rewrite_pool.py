"""Rewrite dequantize -> mean over spatial axes -> quantize (GlobalAveragePool, ReduceMean) into an integer
sum.

    quantize(mean(dequantize(x_q, s_x, zp_x), axes), s_y, zp_y)
=>
    requantize(sum(int32(x_q), axes) - zp_x * K, s_x / (s_y * K))         K = number of averaged elements

This is onnxruntime's QLinearGlobalAveragePool on x86 (which its QDQ optimizer fuses for these nodes): an
exact int32 sum, then the float32 multiplier s_x / (s_y * float(K)). Where onnxruntime keeps the float mean
instead, the two agree except on exact ties.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import Multiplier, qtype_of, requantize, scalar
from .rewrite_registry import register_rewrite

__all__ = ["MeanRewrite", "AvgPoolRewrite"]


@register_rewrite("mean", phase="compute", order=40)
class MeanRewrite:
    """Pattern and rewriter for an average over static axes of a per-tensor quantized input."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.x_q, self.s_x, self.zp_x = wildcard(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        x = is_op("relax.dequantize")(self.x_q, self.s_x, self.zp_x)
        self.mean = is_op("relax.mean")(x)
        self.quant = is_op("relax.quantize")(self.mean, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        x_q = m[self.x_q]
        in_t, out_t = qtype_of(x_q.ty.dtype), qtype_of(m[self.quant].attrs.out_dtype)
        s_x, zp_x, s_y, zp_y = (scalar(m[p]) for p in (self.s_x, self.zp_x, self.s_y, self.zp_y))
        if in_t is None or out_t is None or None in (s_x, zp_x, s_y, zp_y):
            return expr
        attrs = m[self.mean].attrs
        shape = x_q.ty.shape
        axes = range(len(shape)) if attrs.axis is None else [int(a) % len(shape) for a in attrs.axis]
        try:
            k = int(np.prod([int(shape[a]) for a in axes]))
        except TypeError:  # a dynamic averaged axis: K unknown at compile time
            return expr
        if k >= 2**24 or k * 255 >= 2**31:
            return expr
        acc = relax.op.sum(relax.op.astype(x_q, "int32"), axis=list(axes), keepdims=bool(attrs.keepdims))
        if int(zp_x):
            acc = relax.op.add(acc, relax.const(np.int32(-int(zp_x) * k)))
        mult = Multiplier.for_mean(s_x, s_y, k)
        bound = k * max(int(zp_x) - in_t.qmin, in_t.qmax - int(zp_x))
        return requantize(acc, mult, int(zp_y), out_t, out_t.qmin, (), self.requant, bound)


@register_rewrite("avg_pool", phase="compute", order=50)
class AvgPoolRewrite:
    """quantize(avg_pool2d(dequantize(x_q))) -> exact int32 window sums (a depthwise conv with a ones kernel
    on the zero-point-centred integers) -> requantize with float32(s_x) / (float32(s_y) * K) per output
    position, K the window size (count_include_pad) or each window's in-bounds count. The reference's avgpool
    (export run_graph_int). ceil_mode and dilation stay float (DQ -> AveragePool -> Q)."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.x_q, self.s_x, self.zp_x = wildcard(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        x = is_op("relax.dequantize")(self.x_q, self.s_x, self.zp_x)
        self.pool = is_op("relax.nn.avg_pool2d")(x)
        self.quant = is_op("relax.quantize")(self.pool, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        x_q = m[self.x_q]
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        s_x, zp_x, s_y, zp_y = (scalar(m[p]) for p in (self.s_x, self.zp_x, self.s_y, self.zp_y))
        a = m[self.pool].attrs
        in_t = qtype_of(x_q.ty.dtype)
        if in_t is None or out_t is None or None in (s_x, zp_x, s_y, zp_y):
            return expr
        if bool(a.ceil_mode) or str(a.layout) != "NCHW" or any(int(d) != 1 for d in a.dilation):
            return expr
        try:
            c, h, w = (int(d) for d in list(x_q.ty.shape)[1:])
        except (TypeError, ValueError):  # dynamic channels or spatial size
            return expr
        kh, kw = (int(v) for v in a.pool_size)
        sh, sw = (int(v) for v in a.strides)
        top, left, bottom, right = (int(v) for v in a.padding)
        oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
        if bool(a.count_include_pad):
            count = np.full((oh, ow), kh * kw, np.int64)
        else:  # in-bounds positions of each window
            rows = np.array([min(h, i * sh - top + kh) - max(0, i * sh - top) for i in range(oh)])
            cols = np.array([min(w, j * sw - left + kw) - max(0, j * sw - left) for j in range(ow)])
            count = np.outer(rows, cols)
        op = relax.op
        centered = op.subtract(op.astype(x_q, "int32"), relax.const(np.int32(zp_x), "int32"))
        ones = relax.const(np.ones((c, 1, kh, kw), np.int32))
        acc = op.nn.conv2d(centered, ones, strides=(sh, sw), padding=(top, left, bottom, right), groups=c,
                           out_dtype="int32")
        if bool(a.count_include_pad):
            mult, shape = Multiplier.for_mean(s_x, s_y, kh * kw), ()
        else:
            mult, shape = Multiplier.for_mean(s_x, s_y, count.reshape(-1)), (1, 1, oh, ow)
        bound = kh * kw * max(int(zp_x) - in_t.qmin, in_t.qmax - int(zp_x))
        return requantize(acc, mult, int(zp_y), out_t, out_t.qmin, shape, self.requant, bound)
