"""Layout ops of transformers: reshape, permute and select. Like the other pass-through ops they move values only,
so they run on the integers and keep their input's quantization.

They come out of plateau.specialize in canonical form: torch.reshape with static dimensions (-1 for the batch),
torch.permute with a full permutation, torch.select(x, dim, index) (unbind(dim)[i], x[:, i]).
"""

from __future__ import annotations

import torch

from plateau.qgraph import QNode

from .base import OnnxBuilder, OnnxNode, Op, register_op

__all__ = ["Reshape", "Permute", "Select"]


class _Layout(Op):
    quantized_output = False


@register_op
class Reshape(_Layout):
    name = "reshape"
    functions = (torch.reshape,)
    onnx_types = ("Reshape",)

    def from_call(self, f, args, kwargs):
        shape = [int(d) for d in args[1]]
        if shape.count(-1) > 1:
            raise ValueError(f"reshape to {shape}: more than one free dimension")
        return {"shape": shape}, args[:1]

    def run_float(self, n, ins, w, b):
        return ins[0].reshape(n.attrs["shape"])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("Reshape", [ins[0], b.const_i64(f"{n.name}.shape", n.attrs["shape"])], [out], n.name)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        shape = r.node.input[1]
        if shape not in r.consts:
            return None
        dims = [int(d) for d in r.consts[shape]]
        if 0 in dims or dims.count(-1) > 1:
            return None
        return QNode(r.name, self.name, r.inputs[:1], attrs={"shape": dims})


@register_op
class Permute(_Layout):
    name = "permute"
    functions = (torch.permute,)
    onnx_types = ("Transpose",)

    def from_call(self, f, args, kwargs):
        return {"perm": [int(d) for d in args[1]]}, args[:1]

    def run_float(self, n, ins, w, b):
        return ins[0].permute(n.attrs["perm"])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("Transpose", ins, [out], n.name, perm=n.attrs["perm"])

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        perm = r.attrs.get("perm")
        return None if perm is None else QNode(r.name, self.name, r.inputs[:1], attrs={"perm": list(perm)})


@register_op
class Select(_Layout):
    name = "select"
    functions = (torch.select,)
    onnx_types = ("Gather",)

    def from_call(self, f, args, kwargs):
        return {"axis": int(args[1]), "index": int(args[2])}, args[:1]

    def run_float(self, n, ins, w, b):
        return ins[0].select(n.attrs["axis"], n.attrs["index"])

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        idx = b.const_i64(f"{n.name}.index", n.attrs["index"])  # a scalar index drops the axis
        b.node("Gather", [ins[0], idx], [out], n.name, axis=n.attrs["axis"])

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        idx = r.node.input[1]
        if idx not in r.consts or r.consts[idx].ndim != 0:
            return None
        return QNode(r.name, self.name, r.inputs[:1],
                     attrs={"axis": int(r.attrs.get("axis", 0)), "index": int(r.consts[idx])})
