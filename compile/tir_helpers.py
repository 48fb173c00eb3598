"""General TIR schedule helpers: copy a PrimFunc into a schedule, inline safely, parallelize and vectorize.

Bit-exactness: no helper here changes the arithmetic of a block. TVM compiles with LLVM's fp-contract=fast, so
a float multiply inlined into an add could become an FMA and round differently than the unscheduled build;
`inline_safe` refuses exactly that case. Integer arithmetic is exact in any order.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

__all__ = ["fresh_schedule", "has_root", "spatial_only", "inline_safe", "inline_spatial",
           "parallel_vectorize", "static_work"]


def fresh_schedule(func: tirx.PrimFunc, global_symbol: str | None = None) -> Schedule:
    """A Schedule over a deep copy of `func`: TVM's schedule state edits the PrimFunc it is given in place."""
    func = tvm.ir.load_json(tvm.ir.save_json(func))
    if global_symbol:
        func = func.with_attr("global_symbol", global_symbol)
    return Schedule(tvm.IRModule({"main": func}))


def has_root(sch: Schedule) -> bool:
    """Whether `sch` has a block named root (a hand-written PrimFunc may not: schedules leave it alone)."""
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 (no block named root)
        return False


def spatial_only(sch: Schedule, block: SBlockRV) -> bool:
    """Whether every iteration variable of `block` is spatial (no reduction)."""
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _float(dtype: str) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _stored_value(sch: Schedule, block: SBlockRV) -> tvm.ir.expr.Expr | None:
    body = sch.get(block).body
    return body.value if isinstance(body, tirx.BufferStore) else None


def _is_load(expr: object) -> bool:
    return type(expr).__name__ in ("TensorLoad", "BufferLoad")


def _adds_load_of(expr: object, buf: tirx.Buffer) -> bool:
    """Whether `expr` has an Add / Sub with a load of `buf` as a direct operand (None: unknown, so True)."""
    if expr is None:
        return True
    if isinstance(expr, tirx.Add | tirx.Sub):
        if any(_is_load(o) and o.source.same_as(buf) for o in (expr.a, expr.b)):
            return True
    children: list = []
    for attr in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, attr, None)
        if isinstance(child, tvm.ir.expr.Expr):
            children.append(child)
    children.extend(a for a in (getattr(expr, "args", None) or []) if isinstance(a, tvm.ir.expr.Expr))
    return any(_adds_load_of(c, buf) for c in children)


def inline_safe(sch: Schedule, block: SBlockRV) -> bool:
    """Whether inlining `block` into its consumers keeps float results bit-identical: not when it computes a
    float product that a consumer adds or subtracts (LLVM would contract the pair into one FMA)."""
    value = _stored_value(sch, block)
    if value is None:
        return False
    if not (_float(str(value.ty)) and isinstance(value, tirx.Mul)):
        return True
    buf = sch.get(block).writes[0].source
    return not any(_adds_load_of(_stored_value(sch, c), buf) for c in sch.get_consumers(block))


def inline_spatial(sch: Schedule, skip: frozenset | set = frozenset()) -> None:
    """Inline every spatial intermediate block (not writing a parameter) where inline_safe allows it."""
    root = sch.get_sblock("root")
    local = list(sch.get(root).alloc_buffers)  # intermediates; everything else is a parameter
    for blk in reversed(sch.get_child_blocks(root)):
        b = sch.get(blk)
        if b.name_hint in skip or not spatial_only(sch, blk) or not sch.get_consumers(blk):
            continue
        if not all(any(w.source.same_as(x) for x in local) for w in b.writes):
            continue
        if inline_safe(sch, blk):
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001 (a block TVM cannot inline stays a block)
                pass


def parallel_vectorize(sch: Schedule, blk: SBlockRV, max_vector: int = 64, parallel: bool = True) -> None:
    """Vectorize the innermost loop of `blk` when it is short and constant; parallelize the outer two."""
    loops = sch.get_loops(blk)
    if not loops:
        return
    inner = sch.get(loops[-1]).extent
    outer = loops
    if len(loops) >= 2 and isinstance(inner, tirx.IntImm) and 1 < int(inner) <= max_vector:
        sch.vectorize(loops[-1])
        outer = loops[:-1]
    if not parallel:
        return
    if len(outer) >= 2:
        sch.parallel(sch.fuse(*outer[:2]))
    elif outer:
        sch.parallel(outer[0])


def static_work(sch: Schedule, blk: SBlockRV) -> int:
    """Iterations of `blk` per image: the product of its constant loop extents (the batch is symbolic)."""
    work = 1
    for lp in sch.get_loops(blk):
        ext = sch.get(lp).extent
        if isinstance(ext, tirx.IntImm):
            work *= int(ext)
    return work
