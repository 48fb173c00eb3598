"""Conv and Linear: the weighted ops, computed on integers exactly as integer kernels compute them.

    acc = sum((q_x - z_x) * q_w) + q_b                 exact integers (float32 while provably below 2^24)
    q_y = requantize(acc, float32(float32(s_x * s_w) / s_y), z_y)   with a fused ReLU / ReLU6 as the clamp
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plateau.qgraph import ActQ, QNode, WeightQ
from plateau.quant import conv_multiplier, requantize

from .base import OnnxBuilder, OnnxNode, Op, clip_range, register_op

__all__ = ["Conv", "Linear", "exact_dtype"]


def exact_dtype(xin: torch.Tensor, w: WeightQ) -> torch.dtype:
    """float32 when every partial sum of integer products stays below 2^24 (then float32 sums are exact and much
    faster), float64 otherwise."""
    k = w.q[0].numel()
    bound = k * float(xin.abs().max()) * float(w.q.abs().max())
    return torch.float32 if bound < 2**24 else torch.float64


def _requantize(n: QNode, acc: torch.Tensor, ain: ActQ, a: ActQ, w: WeightQ, axis: int) -> torch.Tensor:
    m = torch.from_numpy(conv_multiplier(ain.scale, w.scale.cpu().numpy(), a.scale))
    y = requantize(acc, m, a.zero_point, a.qtype, relu=n.relu, axis=axis)
    return torch.clamp(y, *clip_range(n, a)) if "clip" in n.attrs else y


@register_op
class Conv(Op):
    name = "conv"
    weighted = True
    relu_fusable = True
    modules = (nn.Conv2d,)
    onnx_types = ("Conv",)

    def from_module(self, m: nn.Conv2d, args: list) -> tuple[dict, list]:
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError("only zero padding given as numbers is supported")
        return {"stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
                "groups": m.groups, "kernel": list(m.kernel_size)}, args[:1]

    def run_float(self, n, ins, w, b):
        a = n.attrs
        return F.conv2d(ins[0], w, b, a["stride"], a["padding"], a["dilation"], a["groups"])

    def run_int(self, n, ins, ain, a, w):
        at = n.attrs
        xin = ins[0] - ain[0].zero_point
        dt = exact_dtype(xin, w)
        acc = F.conv2d(xin.to(dt), w.q.to(dt), None, at["stride"], at["padding"], at["dilation"],
                       at["groups"]).double()
        return _requantize(n, acc + w.bias_q.double().view(1, -1, 1, 1), ain[0], a, w, axis=1)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        a = n.attrs
        p = a["padding"]
        b.node("Conv", [ins[0], w, bias], [out], n.name, strides=a["stride"], pads=[p[0], p[1], p[0], p[1]],
               dilations=a["dilation"], group=a["groups"], kernel_shape=a["kernel"])

    def from_onnx(self, r: OnnxNode) -> QNode:
        w = r.tensor(r.node.input[1])
        pads = list(r.attrs.get("pads", [0] * 4))
        if pads[:2] != pads[2:]:
            raise ValueError(f"asymmetric padding {pads} is not supported")
        q = QNode(r.name, self.name, r.inputs[:1], attrs={
            "stride": list(r.attrs.get("strides", [1, 1])), "padding": pads[:2],
            "dilation": list(r.attrs.get("dilations", [1, 1])), "groups": int(r.attrs.get("group", 1)),
            "kernel": list(r.attrs.get("kernel_shape", w.shape[2:]))})
        q.weight = w
        b = r.const_input(2)
        q.bias = r.tensor(b) if b else torch.zeros(w.shape[0])
        return q


@register_op
class Linear(Op):
    name = "linear"
    weighted = True
    relu_fusable = True
    modules = (nn.Linear,)
    onnx_types = ("Gemm", "MatMul")

    def run_float(self, n, ins, w, b):
        return F.linear(ins[0], w, b)

    def run_int(self, n, ins, ain, a, w):
        xin = ins[0] - ain[0].zero_point
        dt = exact_dtype(xin, w)
        acc = F.linear(xin.to(dt), w.q.to(dt)).double() + w.bias_q.double()
        return _requantize(n, acc, ain[0], a, w, axis=-1)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        shape = n.attrs.get("in_shape")
        if shape is None or len(shape) == 2:
            b.node("Gemm", [ins[0], w, bias], [out], n.name, transB=1)
            return
        # Token rows (N, T, C): Gemm is two-dimensional, so rows in, rows out: the integers reshaped before their
        # DequantizeLinear; onnxruntime moves the output's QuantizeLinear past the Reshape back and fuses the Gemm
        # into its integer QGemm.
        rows = b.const_i64(f"{n.name}.rows", [-1, shape[-1]])
        back = b.const_i64(f"{n.name}.tokens", [*shape[:-1], int(n.weight.shape[0])])
        b.reshape_dequantized(ins[0], rows, f"{n.name}.x2d", f"{n.name}_rows")
        b.node("Gemm", [f"{n.name}.x2d", w, bias], [f"{n.name}.y2d"], n.name, transB=1)
        b.node("Reshape", [f"{n.name}.y2d", back], [out], f"{n.name}_tokens")

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        q = QNode(r.name, self.name, r.inputs[:1])
        if r.node.op_type == "MatMul":
            if r.node.input[1] not in r.consts:
                return None  # a product of two activations is another op
            q.weight = r.tensor(r.node.input[1]).T.contiguous()
            q.bias = torch.zeros(q.weight.shape[0])
            return q
        a = r.attrs
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            raise ValueError("only alpha = beta = 1, transA = 0 is supported")
        w = r.tensor(r.node.input[1])
        q.weight = w if a.get("transB", 0) else w.T.contiguous()
        b = r.const_input(2)
        q.bias = r.tensor(b) if b else torch.zeros(q.weight.shape[0])
        return q
