"""Add, Mul and Concat of quantized tensors: ONNX float semantics (dequantize in float32, the op, quantize)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from plateau.qgraph import QNode
from plateau.specialize import Broadcast

from .base import OnnxBuilder, OnnxNode, Op, register_op

__all__ = ["Add", "Mul", "Concat"]


class _Binary(Op):
    onnx_op = ""

    def from_call(self, f, args, kwargs):
        # a constant tensor (a position embedding) becomes a const node in capture; a plain number does not
        if not all(isinstance(a, (fx.Node, torch.Tensor, Broadcast)) for a in args[:2]):
            raise ValueError(f"{self.name} with a constant")
        return {}, args[:2]

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node(self.onnx_op, ins, [out], n.name)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        return QNode(r.name, self.name, r.inputs) if len(r.inputs) == 2 else None


@register_op
class Add(_Binary):
    name, onnx_op = "add", "Add"
    relu_fusable = True
    functions = (operator.add, torch.add)
    onnx_types = ("Add",)

    def run_float(self, n, ins, w, b):
        return ins[0] + ins[1]


@register_op
class Mul(_Binary):
    """A product of two tensors, or of a tensor and a number (attrs["scalar"]; folded into the layer before it
    where plateau.graph_rewrites can, as a transformer's query scale is)."""

    name, onnx_op = "mul", "Mul"
    functions = (operator.mul, torch.mul)
    onnx_types = ("Mul",)

    def from_call(self, f, args, kwargs):
        if len(args) == 2 and isinstance(args[0], fx.Node) and isinstance(args[1], (int, float)) \
                and not isinstance(args[1], bool):
            return {"scalar": float(args[1])}, args[:1]
        return super().from_call(f, args, kwargs)

    def run_float(self, n, ins, w, b):
        return ins[0] * n.attrs["scalar"] if "scalar" in n.attrs else ins[0] * ins[1]

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        if "scalar" in n.attrs:
            b.node("Mul", [ins[0], b.const_f32(f"{n.name}.scalar", n.attrs["scalar"])], [out], n.name)
        else:
            super().to_onnx(b, n, ins, out)


@register_op
class Concat(Op):
    name = "cat"
    functions = (torch.cat,)
    onnx_types = ("Concat",)

    def from_call(self, f, args, kwargs):
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return {"dim": int(dim)}, list(args[0])

    def run_float(self, n, ins, w, b):
        return torch.cat(ins, dim=n.attrs["dim"])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("Concat", ins, [out], n.name, axis=n.attrs["dim"])

    def from_onnx(self, r: OnnxNode) -> QNode:
        return QNode(r.name, self.name, list(r.inputs), attrs={"dim": int(r.attrs["axis"])})
