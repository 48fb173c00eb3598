"""Rewrites of a captured graph into a form that quantizes well and that integer kernels run directly. Each keeps
the float model's function (up to float rounding of folded constants) and returns the graph unchanged when its
pattern does not match. Applied in order by plateau.capture.

    split_projection   a fused projection (timm's qkv Linear, 3C outputs) whose result is only ever cut into its
                       k parts (reshape (.., k, H, D) -> permute k to the front -> select each part) becomes k
                       Linear layers: Q, K and V then get quantization scales of their own
    fold_scalar_mul    x * c right after a conv/linear (through reshape, permute, select): c goes into that
                       layer's weight and bias (the attention scale 1/sqrt(d) into the query projection)
    cat_to_pad_add     cat([constant expanded over the batch, x], dim) -> pad(x) + the constant padded the other
                       way (a class token: no concatenation with a batch-sized constant left in the graph)
    merge_const_adds   (x + c1) + c2 -> x + (c1 + c2) (the class token meets the position embedding)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plateau.qgraph import QGraph, QNode
from plateau.reference import run_graph

__all__ = ["REWRITES", "apply_rewrites", "shapes_of"]

Shapes = dict[str, tuple[int, ...]]
_MOVES = ("reshape", "permute", "select", "identity")


def shapes_of(graph: QGraph) -> Shapes:
    """Every node's output shape at batch 1 (from a float run on zeros)."""
    with torch.no_grad():
        vals = run_graph(graph, torch.zeros(graph.input_shape), keep=True)
    return {k: tuple(v.shape) for k, v in vals.items()}


def _users(graph: QGraph, name: str) -> list[QNode]:
    return [n for n in graph.nodes if name in n.inputs]


def _replace_uses(graph: QGraph, old: str, new: str) -> None:
    for n in graph.nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
    if graph.output == old:
        graph.output = new


def _drop(graph: QGraph, *names: str) -> None:
    graph.nodes = [n for n in graph.nodes if n.name not in names]


def split_projection(graph: QGraph, shapes: Shapes) -> bool:
    for lin in graph.nodes:
        if lin.op != "linear":
            continue
        users = _users(graph, lin.name)
        if len(users) != 1 or users[0].op != "reshape":
            continue
        rs = users[0]
        sh = rs.attrs["shape"]
        out = lin.weight.shape[0]
        if len(sh) != 5 or sh[2] * sh[3] * sh[4] != out or len(_users(graph, rs.name)) != 1:
            continue
        pm = _users(graph, rs.name)[0]
        if pm.op != "permute" or pm.attrs["perm"][0] != 2:
            continue
        sels = _users(graph, pm.name)
        k = sh[2]
        if not sels or any(s.op != "select" or s.attrs["axis"] != 0 for s in sels):
            continue
        part = out // k
        perm = [p - (p > 2) for p in pm.attrs["perm"][1:]]
        at = graph.nodes.index(lin)
        new: list[QNode] = []
        for i in range(k):
            li = QNode(f"{lin.name}_{i}", "linear", list(lin.inputs), f"{lin.module}[{i}]" if lin.module else None,
                       dict(lin.attrs), weight=lin.weight[i * part:(i + 1) * part].clone(),
                       bias=lin.bias[i * part:(i + 1) * part].clone())
            ri = QNode(f"{rs.name}_{i}", "reshape", [li.name], attrs={"shape": [sh[0], sh[1], sh[3], sh[4]]})
            pi = QNode(f"{pm.name}_{i}", "permute", [ri.name], attrs={"perm": perm})
            new += [li, ri, pi]
            for s in sels:
                if s.attrs["index"] == i:
                    _replace_uses(graph, s.name, pi.name)
        _drop(graph, lin.name, rs.name, pm.name, *[s.name for s in sels])
        graph.nodes[at:at] = new
        return True
    return False


def fold_scalar_mul(graph: QGraph, shapes: Shapes) -> bool:
    for m in graph.nodes:
        if m.op != "mul" or "scalar" not in m.attrs:
            continue
        p = graph.node(m.inputs[0])
        chain = [p]
        while p.op in _MOVES and len(_users(graph, p.name)) == 1:
            p = graph.node(p.inputs[0])
            chain.append(p)
        if p.op not in ("linear", "conv") or p.relu or "clip" in p.attrs or len(_users(graph, p.name)) != 1:
            continue
        c = m.attrs["scalar"]
        p.weight, p.bias = p.weight * c, p.bias * c
        _replace_uses(graph, m.name, m.inputs[0])
        _drop(graph, m.name)
        return True
    return False


def cat_to_pad_add(graph: QGraph, shapes: Shapes) -> bool:
    for cat in graph.nodes:
        if cat.op != "cat" or len(cat.inputs) != 2:
            continue
        c, x = (graph.node(i) for i in cat.inputs)
        if c.op != "const" or not c.attrs.get("broadcast") or x.op == "const":
            continue
        d = cat.attrs["dim"] % len(shapes[cat.name])
        n_c = c.attrs["value"].shape[d]
        rank = len(shapes[cat.name])
        pad = [0] * (2 * rank)  # torch order: last dimension first, (before, after) pairs
        pad[2 * (rank - 1 - d)] = n_c
        padded = QNode(f"{cat.name}_pad", "pad", [x.name], attrs={"pad": pad, "rank": rank})
        full = torch.zeros((1, *shapes[cat.name][1:]))
        full.narrow(d, 0, n_c).copy_(c.attrs["value"])
        const = QNode(f"{cat.name}_const", "const", [], attrs={"value": full, "broadcast": False})
        add = QNode(cat.name, "add", [padded.name, const.name])  # keeps the name its users read
        at = graph.nodes.index(cat)
        graph.nodes[at:at + 1] = [padded, const, add]
        _drop(graph, c.name)
        return True
    return False


def merge_const_adds(graph: QGraph, shapes: Shapes) -> bool:
    for outer in graph.nodes:
        if outer.op != "add" or outer.relu:
            continue
        ins = [graph.node(i) for i in outer.inputs]
        consts = [n for n in ins if n.op == "const"]
        inner = [n for n in ins if n.op == "add" and not n.relu and len(_users(graph, n.name)) == 1]
        if len(consts) != 1 or len(inner) != 1 or len(_users(graph, consts[0].name)) != 1:
            continue
        inner_consts = [graph.node(i) for i in inner[0].inputs if graph.node(i).op == "const"]
        if len(inner_consts) != 1 or len(_users(graph, inner_consts[0].name)) != 1:
            continue
        c1, c2 = inner_consts[0], consts[0]
        c1.attrs["value"] = c1.attrs["value"] + c2.attrs["value"]
        _replace_uses(graph, outer.name, inner[0].name)
        _drop(graph, outer.name, c2.name)
        return True
    return False


REWRITES: dict[str, Callable[[QGraph, Shapes], bool]] = {
    "split_projection": split_projection, "fold_scalar_mul": fold_scalar_mul,
    "cat_to_pad_add": cat_to_pad_add, "merge_const_adds": merge_const_adds,
}


def apply_rewrites(graph: QGraph) -> QGraph:
    """Each rewrite until it no longer matches, in order; shapes are re-read after every change."""
    for rewrite in REWRITES.values():
        while rewrite(graph, shapes_of(graph)):
            pass
    return graph
