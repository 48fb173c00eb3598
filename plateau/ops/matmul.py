"""The product of two quantized activations (attention's Q.K^T and P.V): an integer matmul of the zero-point-centred
integers, requantized like a conv with the multiplier float32(float32(s_a * s_b) / s_y) (onnxruntime's
QLinearMatMul, TVM's act-matmul rewrite)."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from plateau.qgraph import QNode
from plateau.quant import conv_multiplier, requantize

from .base import OnnxBuilder, OnnxNode, Op, register_op

__all__ = ["MatMul"]


@register_op
class MatMul(Op):
    name = "matmul"
    functions = (operator.matmul, torch.matmul, torch.bmm)
    onnx_types = ("MatMul",)

    def from_call(self, f, args, kwargs):
        if not all(isinstance(a, fx.Node) for a in args[:2]):
            raise ValueError("matmul with a constant: write it as a Linear layer")
        return {}, args[:2]

    def run_float(self, n, ins, w, b):
        return torch.matmul(ins[0], ins[1])

    def run_int(self, n, ins, ain, a, w):
        xa, xb = ins[0] - ain[0].zero_point, ins[1] - ain[1].zero_point
        bound = xa.shape[-1] * float(xa.abs().max()) * float(xb.abs().max())
        dt = torch.float32 if bound < 2**24 else torch.float64  # float32 sums are exact below 2^24
        acc = torch.matmul(xa.to(dt), xb.to(dt)).double()
        m = torch.from_numpy(np.asarray(conv_multiplier(ain[0].scale, np.float32(ain[1].scale), a.scale)))
        return requantize(acc, m, a.zero_point, a.qtype, axis=None)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("MatMul", ins, [out], n.name)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        return QNode(r.name, self.name, r.inputs[:2]) if len(r.inputs) == 2 else None
