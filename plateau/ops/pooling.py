"""Pooling: global average (GAP), windowed average and max.

Averages are exact integer sums requantized with float32(s_x) / (float32(s_y) * K) (onnxruntime's
QLinearGlobalAveragePool order), K the window size or, without count_include_pad, each window's in-bounds count.
Max pooling selects values, so it runs on the integers and keeps its input's quantization.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plateau.qgraph import QNode
from plateau.quant import mean_multiplier, requantize

from .base import OnnxBuilder, OnnxNode, Op, pool_attrs, register_op

__all__ = ["GlobalAvgPool", "AvgPool", "MaxPool", "Mean"]


@register_op
class GlobalAvgPool(Op):
    name = "gap"
    modules = (nn.AdaptiveAvgPool2d,)
    functions = (F.adaptive_avg_pool2d,)
    onnx_types = ("GlobalAveragePool",)

    def from_module(self, m, args):
        if m.output_size not in (1, (1, 1)):
            raise ValueError("unsupported: AdaptiveAvgPool2d with output size other than 1")
        return {}, args[:1]

    def from_call(self, f, args, kwargs):
        if args[1] not in (1, (1, 1)):
            raise ValueError("adaptive_avg_pool2d to a size other than 1")
        return {}, args[:1]

    def run_float(self, n, ins, w, b):
        return ins[0].mean(dim=(2, 3), keepdim=True)

    def run_int(self, n, ins, ain, a, w):
        acc = (ins[0] - ain[0].zero_point).sum(dim=(2, 3), keepdim=True)
        count = ins[0].shape[2] * ins[0].shape[3]
        m = torch.from_numpy(mean_multiplier(ain[0].scale, a.scale, count))
        return requantize(acc, m, a.zero_point, a.qtype, axis=None)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("GlobalAveragePool", ins, [out], n.name)


def _window_attrs(r: OnnxNode) -> dict:
    a = r.attrs
    k = list(a["kernel_shape"])
    pads = list(a.get("pads", [0] * 4))
    if pads[:2] != pads[2:]:
        raise ValueError(f"asymmetric padding {pads} is not supported")
    return {"kernel": k, "stride": list(a.get("strides", k)), "padding": pads[:2],
            "dilation": list(a.get("dilations", [1, 1])), "ceil_mode": bool(a.get("ceil_mode", 0))}


def _window_onnx(n: QNode) -> dict:
    a = n.attrs
    p = a["padding"]
    return dict(kernel_shape=a["kernel"], strides=a["stride"], pads=[p[0], p[1], p[0], p[1]],
                ceil_mode=int(a["ceil_mode"]))


@register_op
class AvgPool(Op):
    name = "avgpool"
    modules = (nn.AvgPool2d,)
    onnx_types = ("AveragePool",)

    def from_module(self, m, args):
        return pool_attrs(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad), args[:1]

    def run_float(self, n, ins, w, b):
        a = n.attrs
        return F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])

    def run_int(self, n, ins, ain, a, w):
        at = n.attrs
        if at["ceil_mode"]:  # windows past the edge: ONNX float semantics
            return super().run_int(n, ins, ain, a, w)
        xin = ins[0] - ain[0].zero_point
        k, st, pad = at["kernel"], at["stride"], at["padding"]
        # divisor 1: the exact window sums (zero padding is the zero point, 0 once centred)
        acc = F.avg_pool2d(xin, k, st, pad, count_include_pad=True, divisor_override=1)
        if at["count_include_pad"]:
            count = np.float32(k[0] * k[1])
        else:
            ones = torch.ones(1, 1, *xin.shape[2:], dtype=torch.float64)
            count = F.avg_pool2d(ones, k, st, pad, count_include_pad=True, divisor_override=1)[0, 0].numpy()
        m = torch.from_numpy(mean_multiplier(ain[0].scale, a.scale, count))
        return requantize(acc, m, a.zero_point, a.qtype, axis=None)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("AveragePool", ins, [out], n.name, count_include_pad=int(n.attrs["count_include_pad"]),
               **_window_onnx(n))

    def from_onnx(self, r: OnnxNode) -> QNode:
        attrs = _window_attrs(r)
        attrs["count_include_pad"] = bool(r.attrs.get("count_include_pad", 0))
        return QNode(r.name, self.name, r.inputs[:1], attrs=attrs)


@register_op
class MaxPool(Op):
    name = "maxpool"
    quantized_output = False
    modules = (nn.MaxPool2d,)
    onnx_types = ("MaxPool",)

    def from_module(self, m, args):
        return pool_attrs(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode), args[:1]

    def run_float(self, n, ins, w, b):
        a = n.attrs
        return F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("MaxPool", ins, [out], n.name, dilations=n.attrs["dilation"], **_window_onnx(n))

    def from_onnx(self, r: OnnxNode) -> QNode:
        return QNode(r.name, self.name, r.inputs[:1], attrs=_window_attrs(r))


@register_op
class Mean(Op):
    """The mean over some axes (a transformer's average over tokens): exact integer sums, requantized like GAP."""

    name = "mean"
    functions = (torch.mean,)
    methods = ("mean",)
    onnx_types = ("ReduceMean",)

    def _attrs(self, args: list, kwargs: dict) -> tuple[dict, list]:
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            raise ValueError("mean over every axis")
        axes = [int(d) for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        return {"axes": axes, "keepdim": bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))}, args[:1]

    def from_call(self, f, args, kwargs):
        return self._attrs(args, kwargs)

    def from_method(self, method, args, kwargs):
        return self._attrs(args, kwargs)

    def run_float(self, n, ins, w, b):
        return ins[0].mean(dim=n.attrs["axes"], keepdim=n.attrs["keepdim"])

    def run_int(self, n, ins, ain, a, w):
        x = ins[0]
        acc = (x - ain[0].zero_point).sum(dim=n.attrs["axes"], keepdim=n.attrs["keepdim"])
        count = int(np.prod([x.shape[d] for d in n.attrs["axes"]]))
        m = torch.from_numpy(mean_multiplier(ain[0].scale, a.scale, count))
        return requantize(acc, m, a.zero_point, a.qtype, axis=None)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        axes = b.const_i64(f"{n.name}.axes", n.attrs["axes"])
        b.node("ReduceMean", [ins[0], axes], [out], n.name, keepdims=int(n.attrs["keepdim"]))

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        axes = r.const_input(1)
        if axes is None or axes not in r.consts:
            return None
        return QNode(r.name, self.name, r.inputs[:1], attrs={
            "axes": [int(d) for d in r.consts[axes]], "keepdim": bool(r.attrs.get("keepdims", 1))})
