"""What one op kind of the captured graph knows about itself, and the small ONNX graph builder ops write into.

An `Op` entry answers, for its kind, every question a stage asks about a node:

    capture (torch.fx)     modules / functions / methods it claims, and from_module / from_call / from_method
                           -> (attributes, tensor inputs); a ValueError names what is not supported
    reference (float)      run_float(node, inputs, weight, bias): the float32 computation
    reference (integers)   run_int(node, int inputs, their ActQ, own ActQ, weight): integers in, integers out
    ONNX                   to_onnx(builder, node, input names, output name, ...): the float op between Q/DQ;
                           onnx_types + from_onnx(reader context, node): how an FP32 ONNX file spells it

The QDQ writer (export), the reference (plateau.reference), graph capture (plateau.qgraph) and the ONNX reader all
walk the same table, so a new op is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from plateau.qgraph import OPS, ActQ, QNode, WeightQ
from plateau.quant import dequantize, quantize

__all__ = ["Op", "register_op", "OnnxBuilder", "OnnxNode", "pair", "pool_attrs", "dq", "q", "relu_clip", "clip_range"]


def dq(t: torch.Tensor, a: ActQ) -> torch.Tensor:
    """DequantizeLinear of an activation: float32(q - zp) * s."""
    return dequantize(t, np.float32(a.scale), a.zero_point)


def q(y: torch.Tensor, a: ActQ) -> torch.Tensor:
    """QuantizeLinear of a float32 value to an activation's grid: saturate(round(y / s) + zp)."""
    return quantize(y.to(torch.float32), np.float32(a.scale), a.zero_point, a.qtype)


def relu_clip(n: QNode, y: torch.Tensor) -> torch.Tensor:
    """A fused ReLU and a fused ReLU6 / Hardtanh clamp, in float."""
    y = torch.relu(y) if n.relu else y
    return torch.clamp(y, *n.attrs["clip"]) if "clip" in n.attrs else y


def clip_range(n: QNode, a: ActQ) -> tuple[int, int]:
    """The integer bounds of a fused ReLU6 / Hardtanh: [Q(lo), Q(hi)] (quantize is monotone, so quantizing the
    clamped value equals clamping the quantized one to these)."""
    lo, hi = n.attrs["clip"]
    b = quantize(torch.tensor([lo, hi], dtype=torch.float32), np.float32(a.scale), a.zero_point, a.qtype)
    return int(b[0]), int(b[1])


def pair(v: object) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def pool_attrs(k, s, p, d, ceil, count_include_pad=None) -> dict:
    a = {"kernel": pair(k), "stride": pair(s if s is not None else k), "padding": pair(p),
         "dilation": pair(d), "ceil_mode": bool(ceil)}
    if count_include_pad is not None:
        a["count_include_pad"] = bool(count_include_pad)
    return a


class OnnxBuilder:
    """Nodes and initializers of an ONNX graph being written."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, t: onnx.TensorProto) -> str:
        self.inits.append(t)
        return t.name

    def const_f32(self, name: str, v: np.ndarray | float) -> str:
        return self.init(numpy_helper.from_array(np.asarray(v, dtype=np.float32), name))

    def const_i64(self, name: str, v: list[int] | np.ndarray) -> str:
        return self.init(numpy_helper.from_array(np.asarray(v, np.int64), name))

    def node(self, op: str, ins: list[str], outs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))

    def reshape_dequantized(self, tensor: str, shape: str, out: str, name: str) -> None:
        """`out` = Reshape(`tensor`, `shape`), where `tensor` is a DequantizeLinear's output (one per consumer, as
        the writer makes them): the integers are reshaped and dequantized after, so the DequantizeLinear stays next
        to the op that reads it. (onnxruntime, with its x86 defaults, otherwise moves the pair across the Reshape
        itself and makes a QuantizeLinear its own type check then rejects: the file would not load.)"""
        dq = next((n for n in reversed(self.nodes) if tensor in n.output), None)
        if dq is None or dq.op_type != "DequantizeLinear" or any(tensor in n.input for n in self.nodes):
            self.node("Reshape", [tensor, shape], [out], name)
            return
        self.nodes.remove(dq)
        self.node("Reshape", [dq.input[0], shape], [f"{out}.q"], name)
        self.node("DequantizeLinear", [f"{out}.q", *dq.input[1:]], [out], "", **{
            a.name: helper.get_attribute_value(a) for a in dq.attribute})


@dataclass
class OnnxNode:
    """One node of an FP32 ONNX file as the reader hands it to `Op.from_onnx`."""

    node: onnx.NodeProto
    name: str  # ONNX-safe QNode name
    attrs: dict  # the node's attributes as Python values
    inputs: list[str]  # its tensor (non-constant) inputs, already mapped to QNode names
    consts: dict[str, np.ndarray]  # every constant of the file, by tensor name

    def tensor(self, name: str) -> torch.Tensor:
        """A constant of the file as a float32 tensor."""
        return torch.from_numpy(np.array(self.consts[name], dtype=np.float32))

    def const_input(self, k: int) -> str | None:
        """The name of the node's k-th input when it is given (and not the empty name), else None."""
        return self.node.input[k] if len(self.node.input) > k and self.node.input[k] else None


class Op:
    """One kind of node. Subclasses set the class attributes and override what applies to them."""

    name: ClassVar[str] = ""
    quantized_output: ClassVar[bool] = True  # a compute op: its output gets its own quantization
    weighted: ClassVar[bool] = False  # carries a folded float weight and bias (conv, linear)
    relu_fusable: ClassVar[bool] = False  # a following ReLU / ReLU6 is quantized with it
    alias: ClassVar[bool] = False  # no node of its own: the output is the input (Identity, Dropout, ...)
    float_island: ClassVar[bool] = False  # no integer form: captured only with allow_float
    writes_integers: ClassVar[bool] = False  # its integers are an initializer of the file (a constant)
    integer_io: ClassVar[bool] = False  # reads its input's integers, writes integers (no DQ / Q around it)
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[object, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    onnx_types: ClassVar[tuple[str, ...]] = ()

    # --- capture ---------------------------------------------------------------------------------------------------
    def needs_flag(self, attrs: dict) -> bool:
        """A float island that only allow_float admits (see float_island.FloatIsland)."""
        return self.float_island

    def claims_module(self, m: torch.nn.Module) -> bool:
        return isinstance(m, self.modules)

    def claims_call(self, f: object, args: list, kwargs: dict) -> bool:
        return f in self.functions

    def claims_method(self, method: str) -> bool:
        return method in self.methods

    def from_module(self, m: torch.nn.Module, args: list) -> tuple[dict, list]:
        """(attributes, tensor inputs) for a module this op claims; a ValueError says what is not supported."""
        return {}, args[:1]

    def from_call(self, f: object, args: list, kwargs: dict) -> tuple[dict, list]:
        return {}, args[:1]

    def from_method(self, method: str, args: list, kwargs: dict) -> tuple[dict, list]:
        return {}, args[:1]

    # --- the reference ---------------------------------------------------------------------------------------------
    def run_float(self, n: QNode, ins: list[torch.Tensor], w: torch.Tensor | None,
                  b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(self.name)

    def run_int(self, n: QNode, ins: list[torch.Tensor], ain: list[ActQ], a: ActQ | None,
                w: WeightQ | None) -> torch.Tensor:
        """Integers in, integers out. A compute op by default follows ONNX's float semantics: dequantize the
        inputs in float32, the float op (with its fused ReLU / clamp), quantize; a pass-through op acts on the
        integers themselves (exact: it moves, selects or compares values)."""
        if self.quantized_output:
            return q(relu_clip(n, self.run_float(n, [dq(t, ai) for t, ai in zip(ins, ain, strict=True)],
                                                 None, None)), a)
        return self.run_float(n, ins, None, None)

    # --- ONNX ------------------------------------------------------------------------------------------------------
    def to_onnx(self, b: OnnxBuilder, n: QNode, ins: list[str], out: str, w: str | None = None,
                bias: str | None = None) -> None:
        raise NotImplementedError(self.name)

    def from_onnx(self, r: OnnxNode) -> QNode | None:
        """The QNode for an ONNX node whose type is in `onnx_types`; None: not a form this op takes."""
        return QNode(r.name, self.name, r.inputs[:1])


def register_op(cls: type[Op]) -> type[Op]:
    """Class decorator: file one instance of an Op subclass in the op table under its `name`."""
    OPS.add(cls.name, cls())
    return cls
