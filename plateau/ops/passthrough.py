"""Pass-through ops: they move, select or clamp values, so they are exact on the integer grid and keep their
input's quantization (no QuantizeLinear of their own). Also the ops that vanish (Identity, Dropout).

    flatten  to (N, -1)          slice  basic slicing         pad  constant zero (pads with the zero point)
    relu     max(x, zp) on integers, where it could not be fused into the op before it
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from plateau.qgraph import QNode

from .base import OnnxBuilder, OnnxNode, Op, register_op

__all__ = ["Identity", "Relu", "Flatten", "Slice", "Pad"]


class _PassThrough(Op):
    quantized_output = False


@register_op
class Identity(_PassThrough):
    name = "identity"
    alias = True
    modules = (nn.Identity, nn.Dropout)
    methods = ("contiguous",)
    onnx_types = ("Identity", "Dropout")


@register_op
class Relu(_PassThrough):
    name = "relu"
    modules = (nn.ReLU,)
    functions = (F.relu, torch.relu)
    methods = ("relu",)
    onnx_types = ("Relu",)

    def run_float(self, n, ins, w, b):
        return F.relu(ins[0])

    def run_int(self, n, ins, ain, a, w):
        return torch.clamp(ins[0], min=float(ain[0].zero_point))

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("Relu", ins, [out], n.name)


def _start_dim_one(args: list, kwargs: dict, default: int) -> None:
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", default)
    if start != 1:
        raise ValueError("flatten other than start_dim=1")


@register_op
class Flatten(_PassThrough):
    name = "flatten"
    modules = (nn.Flatten,)
    functions = (torch.flatten,)
    methods = ("flatten",)
    onnx_types = ("Flatten", "Reshape")

    def from_module(self, m, args):
        if m.start_dim != 1 or m.end_dim != -1:
            raise ValueError("Flatten other than start_dim=1")
        return {}, args[:1]

    def from_call(self, f, args, kwargs):
        _start_dim_one(args, kwargs, 0)
        return {}, args[:1]

    def from_method(self, method, args, kwargs):
        _start_dim_one(args, kwargs, 0)
        return {}, args[:1]

    def run_float(self, n, ins, w, b):
        return torch.flatten(ins[0], 1)

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        b.node("Flatten", ins, [out], n.name, axis=1)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        if r.node.op_type == "Flatten":
            return QNode(r.name, self.name, r.inputs[:1]) if r.attrs.get("axis", 1) == 1 else None
        shape = r.node.input[1]
        if shape in r.consts and list(r.consts[shape])[1:] == [-1]:
            return QNode(r.name, self.name, r.inputs[:1])
        return None


def _slices(idx: object) -> dict:
    """x[:, :, ::2, ::2] -> ONNX Slice attributes; only basic slices are supported."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    axes, starts, ends, steps = [], [], [], []
    for axis, s in enumerate(idx):
        if not isinstance(s, slice):
            raise ValueError(f"index {s!r}")
        if s == slice(None):
            continue
        step = 1 if s.step is None else s.step
        if step <= 0:
            raise ValueError("negative step")
        axes.append(axis)
        starts.append(0 if s.start is None else s.start)
        ends.append(2**62 if s.stop is None else s.stop)
        steps.append(step)
    return {"axes": axes, "starts": starts, "ends": ends, "steps": steps}


@register_op
class Slice(_PassThrough):
    name = "slice"
    functions = (operator.getitem,)
    onnx_types = ("Slice",)

    def from_call(self, f, args, kwargs):
        return _slices(args[1]), args[:1]

    def run_float(self, n, ins, w, b):
        a = n.attrs
        idx = [slice(None)] * ins[0].ndim
        for ax, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"], strict=False):
            idx[ax] = slice(s, e, st)
        return ins[0][tuple(idx)]

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        args = [b.const_i64(f"{n.name}_{k}", n.attrs[k]) for k in ("starts", "ends", "axes", "steps")]
        b.node("Slice", [ins[0], *args], [out], n.name)

    def from_onnx(self, r: OnnxNode) -> QNode:
        c, inp = r.consts, r.node.input
        starts, ends = c[inp[1]].tolist(), c[inp[2]].tolist()
        axes = c[inp[3]].tolist() if len(inp) > 3 else list(range(len(starts)))
        steps = c[inp[4]].tolist() if len(inp) > 4 else [1] * len(starts)
        return QNode(r.name, self.name, r.inputs[:1], attrs={
            "axes": axes, "starts": starts, "ends": [min(e, 2**62) for e in ends], "steps": steps})


@register_op
class Pad(_PassThrough):
    name = "pad"
    functions = (F.pad,)
    onnx_types = ("Pad",)

    def from_call(self, f, args, kwargs):
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else 0.0)
        if mode != "constant" or (value or 0.0) != 0.0:
            raise ValueError("only constant zero padding")
        return {"pad": list(args[1])}, args[:1]

    def run_float(self, n, ins, w, b):
        return F.pad(ins[0], n.attrs["pad"])

    def run_int(self, n, ins, ain, a, w):
        return F.pad(ins[0], n.attrs["pad"], value=float(ain[0].zero_point))

    def to_onnx(self, b: OnnxBuilder, n, ins, out, w=None, bias=None):
        # torch pads last dimension first, (begin, end) pairs; ONNX lists all begins then all ends.
        tp, rank = n.attrs["pad"], n.attrs.get("rank", 4)
        begins, ends = [0] * rank, [0] * rank
        for i in range(len(tp) // 2):
            begins[rank - 1 - i], ends[rank - 1 - i] = tp[2 * i], tp[2 * i + 1]
        pads = b.const_i64(f"{n.name}_pads", begins + ends)
        b.node("Pad", [ins[0], pads], [out], n.name, mode="constant")

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        if r.attrs.get("mode", b"constant") not in (b"constant", "constant"):
            return None
        pads = r.consts[r.node.input[1]].tolist()
        value = r.const_input(2)
        if value and float(r.consts[value]) != 0.0:
            raise ValueError("only zero padding is supported")
        k = len(pads) // 2
        torch_pad: list[int] = []
        for ax in reversed(range(k)):
            torch_pad += [pads[ax], pads[ax + k]]
        return QNode(r.name, self.name, r.inputs[:1], attrs={"pad": torch_pad})

