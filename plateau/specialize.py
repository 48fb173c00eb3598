"""Specialize a torch.fx graph to its input shape (all but the batch size), so it maps onto the op table.

A symbolic trace of a transformer keeps the Python around the tensor maths: `x.shape` and the arithmetic on it,
`_assert`s, attention-mask helpers that return None, parameters expanded to the batch. None of it depends on the
input's values. This pass runs the graph on two sample inputs (batch 2 and 3) and folds it all away:

    a value that does not depend on the input's data    -> a constant argument of the nodes using it
        an int that follows the batch size               -> BATCH (the reshape dimension that stays free)
        a tensor (a parameter, a parameter expanded)     -> the tensor; one expanded along the batch is
                                                            kept once, wrapped in Broadcast
    a call that returns one of its tensor arguments     -> an alias of that argument (e.g. a mask of None)
    layout calls (view, reshape, flatten, transpose,    -> canonical torch.reshape (-1 for the batch dimension),
    permute, unbind + [i], x[:, i])                        torch.permute, torch.select, with static arguments

Every node left computes on the input's data. The CNN graphs Plateau captured before come out unchanged.
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import fx

from plateau.errors import PlateauError

__all__ = ["BATCH", "Broadcast", "specialize"]


class _Batch:
    """The batch size, wherever a shape mentions it."""

    def __repr__(self) -> str:
        return "BATCH"


BATCH = _Batch()


class Broadcast:
    """A constant tensor that the model expands along the batch (a class token): its batch-1 value."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Broadcast{tuple(self.value.shape)}"


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "type", "is_floating_point"}
_RESHAPES_F = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
_RESHAPES_M = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_PERMUTES_F = {torch.permute, torch.transpose}
_PERMUTES_M = {"permute", "transpose"}


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _is_shape_query(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in _SHAPE_ATTRS
    return n.op == "call_method" and n.target in _SHAPE_METHODS


def _has_tensor(v: object) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(isinstance(u, torch.Tensor) for u in v)


def _run(gm: fx.GraphModule, x: torch.Tensor, defaults: list) -> dict[str, object]:
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(x, *defaults)
    return rec.values


def _fold(a: object, b: object, where: str) -> object:
    """The constant seen as `a` at batch 2 and `b` at batch 3: equal, or the batch size itself."""
    if isinstance(a, torch.Tensor):
        if a.shape == b.shape and torch.equal(a, b):
            return a
        if a.dim() and a.shape[0] == 2 and b.shape[0] == 3 and bool((a == a[:1]).all()):
            return Broadcast(a[:1].clone())
        raise PlateauError(f"{where}: a constant tensor that depends on the batch size in an unsupported way")
    if isinstance(a, (tuple, list, torch.Size)):
        if len(a) != len(b):
            raise PlateauError(f"{where}: a shape whose length depends on the batch size")
        return type(a)(_fold(u, v, where) for u, v in zip(a, b, strict=True)) if not isinstance(a, torch.Size) \
            else tuple(_fold(u, v, where) for u, v in zip(a, b, strict=True))
    if isinstance(a, bool) or a is None or not isinstance(a, int):
        if a != b and not (a is None and b is None):
            raise PlateauError(f"{where}: a value that depends on the batch size ({a!r} vs {b!r})")
        return a
    if a == b:
        return a
    if (a, b) == (2, 3):
        return BATCH
    raise PlateauError(f"{where}: a size computed from the batch size ({a} at batch 2); only the batch itself can "
                       "vary")


def _shape(v2: torch.Tensor, v3: torch.Tensor) -> list[int]:
    """A tensor's shape with -1 where the batch size goes (exactly one dimension may follow it)."""
    dims = [-1 if a != b else a for a, b in zip(v2.shape, v3.shape, strict=True)]
    if dims.count(-1) > 1:
        raise ValueError(f"shape {tuple(v2.shape)} at batch 2 has several dimensions that follow the batch")
    return dims


def _canonical(n: fx.Node, v2: dict, v3: dict) -> tuple[object, tuple] | None:
    """(target, args) of the canonical layout call replacing node `n`, or None when `n` is no layout call."""
    f = n.target
    is_f, is_m = n.op == "call_function", n.op == "call_method"
    src = n.args[0] if n.args else None
    if not isinstance(src, fx.Node) or not isinstance(v2.get(n.name), torch.Tensor):
        return None
    x2, y2, y3 = v2[src.name], v2[n.name], v3[n.name]
    if (is_f and f in _RESHAPES_F) or (is_m and f in _RESHAPES_M):
        if tuple(y2.shape) == tuple(x2.shape):
            return "alias", (src,)
        if is_m and f == "flatten" and (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1 \
                and (n.args[2:3] or [n.kwargs.get("end_dim", -1)])[0] == -1:
            return None  # flatten(1): the CNN classifier's flatten, its own op
        if is_f and f is torch.flatten and (n.args[1:2] or [n.kwargs.get("start_dim", 0)])[0] == 1:
            return None
        return torch.reshape, (src, tuple(_shape(y2, y3)))
    if (is_f and f in _PERMUTES_F) or (is_m and f in _PERMUTES_M):
        if f in ("transpose", torch.transpose):
            d0, d1 = (int(d) % x2.dim() for d in n.args[1:3])
            perm = list(range(x2.dim()))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            dims = n.args[1:] if len(n.args) > 2 or not isinstance(n.args[1], (tuple, list)) else n.args[1]
            perm = [int(d) % x2.dim() for d in dims]
        return torch.permute, (src, tuple(perm))
    if is_m and f == "contiguous":
        return "alias", (src,)
    return None


def _select_of(n: fx.Node, v2: dict) -> tuple[fx.Node, int, int] | None:
    """(tensor, dim, index) when `n` picks one index of one dimension: unbind(dim)[i], or x[:, ..., i]."""
    if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[0], fx.Node):
        return None
    src, idx = n.args
    if src.op in ("call_method", "call_function") and src.target in ("unbind", torch.unbind):
        dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        return src.args[0], int(dim), int(idx)
    if not isinstance(v2.get(src.name), torch.Tensor) or not isinstance(idx, tuple):
        return None
    ints = [k for k, s in enumerate(idx) if isinstance(s, int)]
    if len(ints) != 1 or any(s != slice(None) for k, s in enumerate(idx) if k != ints[0]):
        return None
    return src, ints[0], int(idx[ints[0]])


def specialize(gm: fx.GraphModule, x: torch.Tensor) -> fx.GraphModule:
    """Fold `gm` (traced with torch.fx) to the input shape of `x` (its batch dimension left free), in place."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    params = list(inspect.signature(gm.forward).parameters.values())[1:]
    defaults = [p.default if p.default is not inspect.Parameter.empty else None for p in params]
    x2 = x[:1].expand(2, *x.shape[1:]).clone()
    x3 = x[:1].expand(3, *x.shape[1:]).clone()
    v2, v3 = _run(gm, x2, defaults[: len(placeholders) - 1]), _run(gm, x3, defaults[: len(placeholders) - 1])

    data = {}  # node -> carries tensors computed from the input's values
    for n in g.nodes:
        if n.op == "placeholder":
            data[n.name] = n is placeholders[0]
        elif _is_shape_query(n) or not _has_tensor(v2.get(n.name)):
            data[n.name] = n.op == "output"  # None, a shape, a flag: a constant even if computed from data
        else:
            data[n.name] = any(data[a.name] for a in n.all_input_nodes)

    consts = {n.name: _fold(v2[n.name], v3[n.name], f"node {n.name!r}") for n in g.nodes
              if not data[n.name] and n.op not in ("placeholder", "output")}

    def resolve(a: object) -> object:
        return consts[a.name] if isinstance(a, fx.Node) and a.name in consts else a

    for n in list(g.nodes):
        if not data[n.name] or n.op in ("placeholder", "output"):
            continue
        n.args = fx.node.map_aggregate(n.args, resolve)
        n.kwargs = fx.node.map_aggregate(n.kwargs, resolve)
        out = v2[n.name]
        if n.op != "call_module" and isinstance(out, torch.Tensor):
            same = [a for a in n.all_input_nodes if v2.get(a.name) is out]
            if same and n.op == "call_function" and n.target not in (operator.getitem,):
                n.replace_all_uses_with(same[0])
                continue
        sel = _select_of(n, v2)
        if sel is not None:
            with g.inserting_before(n):
                new = g.call_function(torch.select, sel)
            new.meta = dict(n.meta)
            v2[new.name], v3[new.name], data[new.name] = v2[n.name], v3[n.name], True
            n.replace_all_uses_with(new)
            continue
        canon = _canonical(n, v2, v3)
        if canon is None:
            continue
        target, args = canon
        if target == "alias":
            n.replace_all_uses_with(args[0])
            continue
        with g.inserting_before(n):
            new = g.call_function(target, args)
        new.meta = dict(n.meta)
        v2[new.name], v3[new.name] = v2[n.name], v3[n.name]
        data[new.name] = True
        n.replace_all_uses_with(new)

    # Everything no longer used goes, from the output backwards (asserts, shape arithmetic, unbind tuples).
    for n in reversed(list(g.nodes)):
        if n.op == "output" or n is placeholders[0]:
            continue
        if not n.users:
            g.erase_node(n)
    g.lint()  # no recompile: the folded graph holds constants (tensors, BATCH) only capture reads
    return gm
