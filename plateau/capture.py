"""Capture a torch model as a QGraph: fold BatchNorm, trace with torch.fx, map every FX node to an op of the table.

BatchNorm is folded into the preceding convolution first (torch.fx's conv-bn fusion); the trace is specialized to
the input shape (plateau.specialize: shape arithmetic and masks folded, layout calls made canonical); attention
layers that would call a fused kernel are traced unfused (their matmuls and softmax are quantization points).
Each FX node is then claimed by the first entry of the op table (plateau/ops/) that recognises it; float islands
(float_island.py) only with allow_float; a constant tensor argument becomes a const node. Last, the graph
rewrites of plateau.graph_rewrites (split Q/K/V, fold the attention scale, class token and position embedding).

A ReLU whose input has no other user is fused into the producing op when that op is relu-fusable (quantized
after the ReLU); so is a ReLU6 / Hardtanh (attrs["clip"] = (lo, hi): quantized after the clamp, which on
integers is a clamp to [Q(lo), Q(hi)]).

    >>> graph = capture(model, [1, 3, 32, 32])
    >>> [n.op for n in graph.nodes][:3]
    ['input', 'conv', 'conv']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse as fuse_conv_bn

from plateau.errors import PlateauError
from plateau.graph_rewrites import apply_rewrites, shapes_of
from plateau.ops import OPS, Op, float_kind_of_call, float_kind_of_module
from plateau.qgraph import QGraph, QNode
from plateau.specialize import Broadcast, specialize

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
        if op.float_island and not allow_float and op.needs_flag(found[0]):
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


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Attention layers (timm's `fused_attn`) compute Q.K^T, softmax and P.V step by step while inside: each is a
    quantization point then, and a Hessian-vector product can differentiate through them."""
    saved = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, was in saved:
            m.fused_attn = was


def trace(model: nn.Module, input_shape: list[int] | tuple[int, ...]) -> fx.GraphModule:
    """BN folded, traced with torch.fx (attention unfused) and specialized to `input_shape` (batch left free)."""
    model = model.eval()
    try:
        with unfused_attention(model):
            gm = fuse_conv_bn(model, inplace=False).cpu()  # a copy: the graph lives on the CPU
            return specialize(gm, torch.zeros(list(input_shape)))
    except PlateauError:
        raise
    except Exception as e:
        raise PlateauError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def capture(model: nn.Module, input_shape: list[int] | tuple[int, ...], allow_float: bool = False) -> QGraph:
    """Fold BN, trace with torch.fx and map every node to a QNode; unsupported ops raise PlateauError naming them.

    allow_float keeps ops with no integer form but a float one (float_island.FLOAT_KINDS) as float islands."""
    gm = trace(model, input_shape)
    nodes: list[QNode] = []
    alias: dict[str, str] = {}  # fx node name -> QNode name carrying its value

    def src(a: object) -> str:
        if isinstance(a, (torch.Tensor, Broadcast)):  # a constant the model adds or concatenates
            value = a.value if isinstance(a, Broadcast) else a.detach().float()
            value = value if value.dim() and value.shape[0] == 1 else value.unsqueeze(0)
            c = QNode(f"const_{len(nodes)}", "const", [],
                      attrs={"value": value.detach().clone(), "broadcast": isinstance(a, Broadcast)})
            nodes.append(c)
            return c.name
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
            stack = node.meta.get("nn_module_stack")
            if node.op != "call_module" and stack:  # a function call inside a module: name that module
                q.module = next(reversed(stack))
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
    graph = apply_rewrites(QGraph(nodes, output, list(input_shape)))
    shapes = shapes_of(graph)
    for n in graph.nodes:
        if n.op == "linear" and len(shapes[n.inputs[0]]) > 2:  # token rows: the ONNX writer needs the shape
            n.attrs["in_shape"] = [-1, *shapes[n.inputs[0]][1:]]
    graph.refresh()
    return graph
