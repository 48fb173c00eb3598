"""Capture a torch model as a QGraph: fold BatchNorm, trace with torch.fx, map every FX node to an op of the table.

BatchNorm is folded into the preceding convolution first (torch.fx's conv-bn fusion). Each FX node is then
claimed by the first entry of the op table (plateau/ops/) that recognises it; float islands (float_island.py)
only with allow_float. A ReLU whose input has no other user is fused into the producing op when that op is
relu-fusable (quantized after the ReLU); so is a ReLU6 / Hardtanh (attrs["clip"] = (lo, hi): quantized after the
clamp, which on integers is a clamp to [Q(lo), Q(hi)]).

    >>> graph = capture(model, [1, 3, 32, 32])
    >>> [n.op for n in graph.nodes][:3]
    ['input', 'conv', 'conv']
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn

from plateau.errors import PlateauError
from plateau.ops import OPS, Op, float_kind_of_call, float_kind_of_module
from plateau.qgraph import QGraph, QNode

__all__ = ["capture"]


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    t = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {t})"


def _ops_in_order() -> list[Op]:
    """Integer ops first, the float island last: an op with an integer form is never kept in float."""
    return sorted((op for _, op in OPS.items()), key=lambda op: op.float_island)


def _claim(node: fx.Node, gm: fx.GraphModule, op: Op) -> tuple[dict, list] | None:
    """What `op` makes of the node, or None when it does not claim it."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return op.from_module(m, args) if op.claims_module(m) else None
    if node.op == "call_function":
        return op.from_call(node.target, args, kwargs) if op.claims_call(node.target, args, kwargs) else None
    return op.from_method(node.target, args, kwargs) if op.claims_method(node.target) else None


def _classify(node: fx.Node, gm: fx.GraphModule, allow_float: bool) -> tuple[Op, dict, list]:
    """(op, attributes, tensor inputs) of one FX node; a ValueError says why it has no quantized form."""
    if node.op == "call_module":
        what = type(gm.get_submodule(node.target)).__name__
    elif node.op == "call_function":
        what = f"function {getattr(node.target, '__name__', node.target)}"
    elif node.op == "call_method":
        what = f"method .{node.target}()"
    else:
        raise ValueError(f"unsupported FX op {node.op}")
    for op in _ops_in_order():
        found = _claim(node, gm, op)
        if found is None:
            continue
        if op.float_island and not allow_float:
            raise ValueError(f"no integer form for {what}; --allow-float (allow_float=True) keeps it in float "
                             "between DequantizeLinear and QuantizeLinear")
        return op, *found
    raise ValueError(f"no quantized form for {what}")


def _clip_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float] | None:
    """(lo, hi) when `node` is a ReLU6 / Hardtanh (module or function), else None."""
    found = None
    if node.op == "call_module":
        found = float_kind_of_module(gm.get_submodule(node.target))
    elif node.op == "call_function":
        found = float_kind_of_call(node.target, list(node.args), dict(node.kwargs))
    if found is None or found[0] != "clip" or not isinstance(node.args[0], fx.Node):
        return None
    return float(found[1]["min"]), float(found[1]["max"])


def capture(model: nn.Module, input_shape: list[int] | tuple[int, ...], allow_float: bool = False) -> QGraph:
    """Fold BN, trace with torch.fx and map every node to a QNode; unsupported ops raise PlateauError naming them.

    allow_float keeps ops with no integer form but a float one (float_island.FLOAT_KINDS) as float islands."""
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

    def fusable(p: QNode, user: fx.Node) -> bool:
        return (p.op != "input" and OPS.get(p.op).relu_fusable and not p.relu and "clip" not in p.attrs
                and len(user.users) == 1)

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
                if fusable(p, node.args[0]):
                    p.attrs["clip"] = bounds
                    alias[node.name] = p.name
                    continue
            op, attrs, inputs = _classify(node, gm, allow_float)
            if op.alias:
                alias[node.name] = src(inputs[0])
                continue
            if op.name == "relu":
                p = producer(src(inputs[0]))
                if p.op != "input" and OPS.get(p.op).relu_fusable and not p.relu and len(inputs[0].users) == 1:
                    p.relu = True
                    alias[node.name] = p.name
                    continue
            q = QNode(node.name, op.name, [src(a) for a in inputs], attrs=attrs)
            if node.op == "call_module":
                q.module = str(node.target)
                if op.weighted:
                    mod = gm.get_submodule(node.target)
                    q.weight = mod.weight.detach().clone().float()
                    q.bias = (mod.bias.detach().clone().float() if mod.bias is not None
                              else torch.zeros(mod.weight.shape[0]))
            nodes.append(q)
            alias[node.name] = q.name
        except (ValueError, KeyError, TypeError) as e:
            raise PlateauError(f"cannot quantize {_describe(node, gm)}: {e}") from None
    assert output is not None
    return QGraph(nodes, output, list(input_shape))
