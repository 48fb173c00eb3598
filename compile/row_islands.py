"""Fuse each row-wise island (Softmax, LayerNorm: reductions over the last axis between elementwise steps) into
one kernel, so a row's max, sums and normalization run while the row is in cache.

TVM's FuseOps never puts a reduction together with what follows it: the exact Softmax of a ViT block (integer
max, a table lookup, a sum, a division, the quantize) becomes five kernels, each writing a 64-bit tensor of the
whole batch to memory and reading it back. This pass marks a reduction over the last axis only (keepdims) as
injective before FuseOps, so the whole island fuses into one PrimFunc; `schedule_row_island` then computes
every block of it per row, rows in parallel. The blocks themselves are untouched: same arithmetic, same bits.

    >>> mod = narrow_row_max(mod)               # Relax: a row max of widened bytes taken on the bytes
    >>> mod = mark_row_reductions(mod)          # after AnnotateTIROpPattern, before FuseOps
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule

from ._common import mutate_relax_functions
from .tir_helpers import fresh_schedule, has_root, inline_spatial, spatial_only

__all__ = ["mark_row_reductions", "narrow_row_max", "schedule_row_island", "INJECTIVE"]

INJECTIVE = 2  # TVM's OpPatternKind kInjective (kCommReduce is 3)
ROW_VECTOR = 16  # elements per vectorized chunk of an island's row loops (8 and 16 measured alike on AVX2, 4 slower)


def _row_reduction(func: tirx.PrimFunc) -> bool:
    """Whether `func` is one reduction block over the last axis of its input, kept as a unit axis."""
    sch = fresh_schedule(func)
    if not has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1 or spatial_only(sch, blocks[0]):
        return False
    ivs = sch.get(blocks[0]).iter_vars
    reduce = [iv for iv in ivs if iv.iter_type == tirx.IterVar.CommReduce]
    spatial = [iv for iv in ivs if iv.iter_type == tirx.IterVar.DataPar]
    if len(reduce) != 1 or len(spatial) + 1 != len(ivs) or not spatial:
        return False
    last = spatial[-1].dom.extent
    return isinstance(last, tirx.IntImm) and int(last) == 1


@tvm.transform.module_pass(opt_level=0, name="MarkRowReductions")
def mark_row_reductions(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark every last-axis keepdims reduction PrimFunc as injective, so FuseOps fuses it with its island.
    (The Softmax's table lookup joins the island through lut_compose.mark_table_lookups.)"""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and _row_reduction(func):
            out[gv] = func.with_attr("op_pattern", INJECTIVE)
    return out


def _row_value(sch: Schedule, blk) -> bool:
    """Whether a spatial block writes one value per row (its output's last axis is 1)."""
    if not spatial_only(sch, blk):
        return False
    shape = sch.get(blk).writes[0].source.shape
    return len(shape) > 1 and isinstance(shape[-1], tirx.IntImm) and int(shape[-1]) == 1


def schedule_row_island(sch: Schedule) -> bool:
    """A fused island (its reductions all over the last axis): every block computed per row of the output,
    rows in parallel, inner loops vectorized. False, changing nothing, for any other function."""
    if not has_root(sch):
        return False
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    reductions = [b for b in blocks if not spatial_only(sch, b)]
    if not reductions or len(blocks) < 2:
        return False
    for blk in reductions:
        ivs = sch.get(blk).iter_vars
        if ivs[-1].iter_type != tirx.IterVar.CommReduce or len(sch.get_loops(blk)) != len(ivs):
            return False
    # a per-row value (a LayerNorm's 1 / sqrt(variance), last axis 1) stays a block: inlined, it would be
    # recomputed for every element of the row
    per_row = {sch.get(b).name_hint for b in blocks if _row_value(sch, b)}
    inline_spatial(sch, skip=per_row)
    blocks = sch.get_child_blocks(root)
    outs = [b for b in blocks if not sch.get_consumers(b)]
    if len(outs) != 1:
        return False
    out_name = sch.get(outs[0]).name_hint
    loops = sch.get_loops(outs[0])
    if len(loops) < 2:
        return False
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    for blk in reversed(sch.get_child_blocks(root)):
        if sch.get(blk).name_hint != out_name:
            sch.compute_at(blk, row)
    sch.parallel(row)
    for blk in sch.get_child_blocks(row):
        if spatial_only(sch, blk):
            _vectorize_row(sch, sch.get_loops(blk)[-1])
    return True


def _vectorize_row(sch: Schedule, inner) -> None:
    """Vectorize a row loop in chunks of ROW_VECTOR. Why: vectorized whole, a 192-wide LayerNorm row becomes one
    <192 x double> LLVM vector that spills to the stack at every step (the island 2.5x slower on a Zen 2). A row
    that does not divide (a Softmax over 65 or 197 tokens) is split in two loops, the whole chunks vectorized and
    the tail scalar: one predicated loop would run all of it scalar (TVM does not vectorize a guarded body)."""
    ext = sch.get(inner).extent
    if not (isinstance(ext, tirx.IntImm) and int(ext) > 1):
        return
    n, f = int(ext), ROW_VECTOR
    if n <= f:
        sch.vectorize(inner)
        return
    outer, inner = sch.split(inner, [None, f])
    if n % f:
        chunks = sch.loop_partition(outer, [n // f, None])[0]  # [whole chunks, the tail]
        inner = sch.get_loops(sch.get_child_blocks(chunks)[0])[-1]
    sch.vectorize(inner)


@relax.expr_functor.mutator
class _NarrowRowMax(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.max", "relax.min")
                and isinstance(call.args[0], relax.Var)):
            return call
        wide = self.lookup_binding(call.args[0])
        if not (isinstance(wide, relax.Call) and isinstance(wide.op, tvm.ir.Op) and wide.op.name == "relax.astype"
                and str(getattr(wide.args[0].ty, "dtype", "")) in ("int8", "uint8")
                and str(wide.attrs.dtype).startswith("int")):
            return call
        reduce = relax.op.max if call.op.name == "relax.max" else relax.op.min
        narrow = reduce(wide.args[0], axis=call.attrs.axis, keepdims=call.attrs.keepdims)
        return relax.op.astype(narrow, str(wide.attrs.dtype))


def narrow_row_max(mod: tvm.IRModule) -> tvm.IRModule:
    """max / min of a widened 8-bit tensor taken on the bytes, then widened (the same integers): the Softmax
    island then reads the 8-bit scores its matmul writes, not a 64-bit copy of them."""
    return mutate_relax_functions(_NarrowRowMax(mod), mod)
