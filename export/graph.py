"""Capture a model as a short list of quantizable nodes (QGraph).

The fake-quant reference (reference.py) and the ONNX writer (onnx_writer.py) both walk this one list, so the
numbers the reference defines and the graph onnxruntime and TVM execute have the same structure by construction.

BatchNorm is folded into the preceding convolution first (torch.fx's conv-bn fusion). Then each FX node maps to
one QNode op:
    compute ops (own output quantization): conv, linear, add, mul, gap, avgpool, cat, float (an island kept in
        float with allow_float: GELU, Softmax, LayerNorm, ... see float_ops.py)
    pass-through ops (exact on the integer grid, share their input's scale): maxpool, flatten, slice, pad, relu
A ReLU whose input has no other user is fused into the producing compute op (quantized after the ReLU); so is a
ReLU6 / Hardtanh (attrs["clip"] = (lo, hi): quantized after the clamp, which on integers is a clamp to
[Q(lo), Q(hi)]).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn

from plateau.errors import PlateauError

from .float_ops import float_op_of_function, float_op_of_module

__all__ = ["QNode", "QGraph", "capture", "COMPUTE_OPS", "PASS_THROUGH_OPS"]

COMPUTE_OPS = {"conv", "linear", "add", "mul", "gap", "avgpool", "cat", "float"}
PASS_THROUGH_OPS = {"maxpool", "flatten", "slice", "pad", "relu"}
_RELU_FUSABLE = {"conv", "linear", "add"}


@dataclass
class QNode:
    name: str  # unique, ONNX-safe
    op: str
    inputs: list[str]
    module: str | None = None  # module path, for messages and per-layer settings
    attrs: dict = field(default_factory=dict)
    relu: bool = False
    weight: torch.Tensor | None = None  # folded float weight (conv/linear)
    bias: torch.Tensor | None = None

    @property
    def quantized_output(self) -> bool:
        return self.op in COMPUTE_OPS or self.op == "input"

    @property
    def is_weighted(self) -> bool:
        return self.op in ("conv", "linear")


@dataclass
class QGraph:
    nodes: list[QNode]
    output: str
    input_shape: list[int]

    def node(self, name: str) -> QNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def weighted(self) -> list[QNode]:
        return [n for n in self.nodes if n.is_weighted]

    def quant_source(self, name: str) -> str:
        """The node whose output quantization a tensor carries (follow pass-through ops upstream)."""
        n = self.node(name)
        while n.op in PASS_THROUGH_OPS:
            n = self.node(n.inputs[0])
        return n.name


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


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    t = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {t})"


def capture(model: nn.Module, input_shape: list[int] | tuple[int, ...], allow_float: bool = False) -> QGraph:
    """Fold BN, trace with torch.fx and map every node to a QNode; unsupported ops raise PlateauError naming them.

    allow_float keeps ops with no integer form but a float one (float_ops.FLOAT_KINDS) as float islands."""
    model = model.eval()
    try:
        gm = fuse_conv_bn(model, inplace=False)
    except Exception as e:
        raise PlateauError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e})") from None
    nodes: list[QNode] = []
    alias: dict[str, str] = {}  # fx node name -> QNode name carrying its value

    def src(a: object) -> str:
        if not isinstance(a, fx.Node):
            raise ValueError(f"non-tensor argument {a!r}")
        return alias[a.name]

    def producer(name: str) -> QNode:
        return next(n for n in nodes if n.name == name)

    output = None
    for node in gm.graph.nodes:
        try:
            if node.op == "placeholder":
                nodes.append(QNode(node.name, "input", []))
                alias[node.name] = node.name
                continue
            if node.op == "output":
                output = src(node.args[0])
                continue
            if node.op == "get_attr":
                raise ValueError("parameter used outside a layer")
            bounds = _clip_bounds(node, gm)
            if bounds is not None:
                p = producer(src(node.args[0]))
                if p.op in _RELU_FUSABLE and not p.relu and "clip" not in p.attrs and len(node.args[0].users) == 1:
                    p.attrs["clip"] = bounds
                    alias[node.name] = p.name
                    continue
            kind, attrs, inputs = _classify(node, gm, allow_float)
            if kind == "identity":
                alias[node.name] = src(inputs[0])
                continue
            if kind == "relu":
                p = producer(src(inputs[0]))
                if p.op in _RELU_FUSABLE and not p.relu and len(inputs[0].users) == 1:
                    p.relu = True
                    alias[node.name] = p.name
                    continue
            q = QNode(node.name, kind, [src(a) for a in inputs], attrs=attrs)
            if node.op == "call_module":
                q.module = str(node.target)
                mod = gm.get_submodule(node.target)
                if kind in ("conv", "linear"):
                    q.weight = mod.weight.detach().clone().float()
                    b = mod.bias
                    q.bias = (b.detach().clone().float() if b is not None
                              else torch.zeros(mod.weight.shape[0]))
            nodes.append(q)
            alias[node.name] = q.name
        except (ValueError, KeyError, TypeError) as e:
            raise PlateauError(f"cannot quantize {_describe(node, gm)}: {e}") from None
    assert output is not None
    # Names of modules in the original model (fx renames 'layer1.0.conv1' to 'layer1_0_conv1').
    return QGraph(nodes, output, list(input_shape))


def _clip_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float] | None:
    """(lo, hi) when `node` is a ReLU6 / Hardtanh (module or function), else None."""
    found = None
    if node.op == "call_module":
        found = float_op_of_module(gm.get_submodule(node.target))
    elif node.op == "call_function":
        found = float_op_of_function(node.target, list(node.args), dict(node.kwargs))
    if found is None or found[0] != "clip" or not isinstance(node.args[0], fx.Node):
        return None
    return float(found[1]["min"]), float(found[1]["max"])


def _island(found: tuple[str, dict], what: str, allow_float: bool, inputs: list) -> tuple[str, dict, list]:
    if not allow_float:
        raise ValueError(f"no integer form for {what}; --allow-float (allow_float=True) keeps it in float between "
                         "DequantizeLinear and QuantizeLinear")
    kind, params = found
    return "float", {"kind": kind, "params": params}, inputs


def _classify(node: fx.Node, gm: fx.GraphModule, allow_float: bool = False) -> tuple[str, dict, list]:
    """(op kind, attributes, tensor inputs) for one FX node."""
    args = list(node.args)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError("only zero padding given as numbers is supported")
            return "conv", {"stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
                            "groups": m.groups, "kernel": list(m.kernel_size)}, args[:1]
        if isinstance(m, nn.Linear):
            return "linear", {}, args[:1]
        if isinstance(m, nn.ReLU):
            return "relu", {}, args[:1]
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return "identity", {}, args[:1]
        if isinstance(m, nn.MaxPool2d):
            return "maxpool", _pool_attrs(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode), args[:1]
        if isinstance(m, nn.AvgPool2d):
            return "avgpool", _pool_attrs(m.kernel_size, m.stride, m.padding, 1, m.ceil_mode,
                                          m.count_include_pad), args[:1]
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if m.output_size not in (1, (1, 1)):
                raise ValueError("unsupported: AdaptiveAvgPool2d with output size other than 1")
            return "gap", {}, args[:1]
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError("Flatten other than start_dim=1")
            return "flatten", {}, args[:1]
        found = float_op_of_module(m)
        if found is not None:
            return _island(found, type(m).__name__, allow_float, args[:1])
        raise ValueError(f"no quantized form for {type(m).__name__}")
    if node.op == "call_function":
        f = node.target
        if f in (F.relu, torch.relu):
            return "relu", {}, args[:1]
        if f in (operator.add, torch.add):
            if not all(isinstance(a, fx.Node) for a in args[:2]):
                raise ValueError("add with a constant")
            return "add", {}, args[:2]
        if f in (operator.mul, torch.mul):
            if not all(isinstance(a, fx.Node) for a in args[:2]):
                raise ValueError("mul with a constant")
            return "mul", {}, args[:2]
        if f is operator.getitem:
            return "slice", _slices(args[1]), args[:1]
        if f is F.pad:
            pad = list(args[1])
            mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            value = node.kwargs.get("value", args[3] if len(args) > 3 else 0.0)
            if mode != "constant" or (value or 0.0) != 0.0:
                raise ValueError("only constant zero padding")
            return "pad", {"pad": pad}, args[:1]
        if f is F.adaptive_avg_pool2d:
            if args[1] not in (1, (1, 1)):
                raise ValueError("adaptive_avg_pool2d to a size other than 1")
            return "gap", {}, args[:1]
        if f is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise ValueError("flatten other than start_dim=1")
            return "flatten", {}, args[:1]
        if f is torch.cat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return "cat", {"dim": dim}, list(args[0])
        found = float_op_of_function(f, args, dict(node.kwargs))
        if found is not None:
            return _island(found, f"function {getattr(f, '__name__', f)}", allow_float, args[:1])
        raise ValueError(f"no quantized form for function {getattr(f, '__name__', f)}")
    if node.op == "call_method":
        if node.target == "relu":
            return "relu", {}, args[:1]
        if node.target == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise ValueError("flatten other than start_dim=1")
            return "flatten", {}, args[:1]
        if node.target in ("contiguous",):
            return "identity", {}, args[:1]
        if node.target in ("sigmoid", "tanh"):
            return _island((node.target, {}), f"method .{node.target}()", allow_float, args[:1])
        raise ValueError(f"no quantized form for method .{node.target}()")
    raise ValueError(f"unsupported FX op {node.op}")


def _pair(v: object) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _pool_attrs(k, s, p, d, ceil, count_include_pad=None) -> dict:
    a = {"kernel": _pair(k), "stride": _pair(s if s is not None else k), "padding": _pair(p),
         "dilation": _pair(d), "ceil_mode": bool(ceil)}
    if count_include_pad is not None:
        a["count_include_pad"] = bool(count_include_pad)
    return a
