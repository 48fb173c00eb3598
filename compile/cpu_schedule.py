"""Hand-written CPU schedules of every fused PrimFunc: fast integer kernels without tuning.

TVM's default CPU pipeline schedules nothing: every kernel runs single-threaded loops as legalized.
`schedule_primfuncs` (run by cpu_pipeline.scheduled_pipeline after FuseOps / FuseTIR) picks one schedule per
function:
- the dot conv / matmul (dot_schedule.py): register tiles, tensorized, epilogue fused per tile, rows parallel;
- the depthwise conv (dot_schedule.py), else its outer loops in parallel;
- a function made only of spatial blocks (pad, quantize, residual add, ...): intermediate blocks inlined where
  that cannot change a float result (tir_helpers.inline_safe), inner loops vectorized;
- attention's matmul of two activations: on the dot instruction (dot_act_matmul.py), per (batch, head);
  one the dot rewrite did not take: `schedule_int_matmul`;
- a fused row island (Softmax / LayerNorm, row_islands.py): every block per row, rows in parallel;
- anything else with enough work: its leading spatial loops in parallel.

The arithmetic of every block is unchanged: the scheduled build computes the numbers of the unscheduled one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from .dot_act_matmul import ACT_DOT_BLOCK, act_kernel, schedule_act_dot
from .dot_compute import DW_BLOCK
from .dot_instructions import DotKernel
from .dot_schedule import TileChooser, find_conv_block, kernel_of, schedule_dot_conv, schedule_dw_conv
from .row_islands import schedule_row_island
from .tir_helpers import (
    fresh_schedule,
    has_root,
    inline_spatial,
    parallel_vectorize,
    spatial_only,
    static_work,
)

__all__ = ["schedule_primfuncs", "schedule_injective", "schedule_outer_parallel", "schedule_int_matmul",
           "PARALLEL_ELEMENTWISE", "MIN_PARALLEL_WORK"]

log = logging.getLogger(__name__)

# Small elementwise kernels (pad + shift, residual adds outside a conv, quantize) are memory copies of a few KB
# per image. A parallel loop costs a thread-pool barrier per kernel, and on a loaded machine the barrier waits
# for a descheduled worker (milliseconds at batch 1): below MIN_PARALLEL_ELEMENTS serial vectorized loops cost
# less. True: every one in parallel.
PARALLEL_ELEMENTWISE = False

MIN_PARALLEL_WORK = 1 << 16  # iterations per image below which a reduction kernel stays serial
# A spatial kernel with this much work per image runs its outer loops in parallel. Measured (2 threads, Zen 4,
# interleaved, medians): ViT-Tiny W8A8 batch 64 158 -> 105 ms (the exact islands' table lookups, the GELU,
# the residual adds), ResNet-20 batch 64 14.2 -> 12.6 ms; batch 1 unchanged on both (0.27 ms on ResNet-20).
MIN_PARALLEL_ELEMENTS = 1 << 13


def schedule_injective(sch: Schedule) -> bool:
    """For a function made only of spatial blocks: inline the safe intermediates, then vectorize every
    remaining block, and parallelize those with MIN_PARALLEL_ELEMENTS of work per image (all of them with
    PARALLEL_ELEMENTWISE). Returns False, changing nothing, when the function has a reduction."""
    if not has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks or not all(spatial_only(sch, b) for b in blocks):
        return False
    inline_spatial(sch)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        heavy = static_work(sch, blk) >= MIN_PARALLEL_ELEMENTS
        parallel_vectorize(sch, blk, parallel=PARALLEL_ELEMENTWISE or heavy)
    return True


def schedule_outer_parallel(sch: Schedule) -> bool:
    """Any other kernel (a conv the dot kernel does not take, a matmul, a mean): run the leading spatial loops
    of each block in parallel, the rest as built. The reduction order inside each output is untouched."""
    if not has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if max(static_work(sch, b) for b in blocks) < MIN_PARALLEL_WORK:
        return False  # a mean or a classifier: a pool barrier costs more than the loop
    done = False
    for blk in blocks:
        loops = sch.get_loops(blk)
        ivs = sch.get(blk).iter_vars
        lead = 0
        while lead < min(len(loops), len(ivs), 2) and ivs[lead].iter_type == tirx.IterVar.DataPar:
            lead += 1
        if lead == 0 or len(loops) != len(ivs):
            continue
        sch.parallel(sch.fuse(*loops[:lead]) if lead > 1 else loops[0])
        done = True
    return done


def _vector_width(extent: int) -> int:
    """The largest divisor of `extent` up to 16 (int32 lanes of a zmm): vectorizes without a tail."""
    return max(d for d in range(1, 17) if extent % d == 0)


def schedule_int_matmul(sch: Schedule) -> bool:
    """An integer matmul of two activations (attention's Q.K^T and P.V: TVM's "matmul" block, loops batch...,
    rows, columns, k): the reduction moved outside the columns, so each row of B streams contiguously and the
    columns vectorize; a few rows share each B row (unrolled); batch loops in parallel; the elementwise
    epilogue inlined and vectorized. Integer sums: any order gives the same result. False, changing nothing,
    for anything else (a float matmul keeps its order: the rounding would change)."""
    if not has_root(sch):
        return False
    inline_spatial(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if not spatial_only(sch, b)]
    if len(reductions) != 1 or not sch.get(reductions[0]).name_hint.startswith("matmul"):
        return False
    mm = reductions[0]
    ivs = sch.get(mm).iter_vars
    loops = sch.get_loops(mm)
    out_dtype = str(sch.get(mm).writes[0].source.dtype)
    if (len(loops) != len(ivs) or len(ivs) < 3 or ivs[-1].iter_type != tirx.IterVar.CommReduce
            or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[:-1]) or not out_dtype.startswith("int")
            or static_work(sch, mm) < MIN_PARALLEL_WORK):
        return False
    *batch, i, j, k = loops
    rows = sch.get(i).extent
    if not isinstance(rows, tirx.IntImm):
        return False
    io, ii = sch.split(i, [None, next(r for r in (5, 4, 3, 2, 1) if int(rows) % r == 0)])
    sch.reorder(*batch, io, k, ii, j)
    sch.unroll(ii)
    sch.parallel(sch.fuse(*batch) if len(batch) > 1 else (batch[0] if batch else io))
    for blk in blocks:
        if blk.same_as(mm):
            continue
        outer = sch.get_loops(blk)
        if len(outer) >= 2:
            sch.parallel(sch.fuse(*outer[:2]))
        last = sch.get_loops(blk)[-1]
        ext = sch.get(last).extent
        if isinstance(ext, tirx.IntImm) and _vector_width(int(ext)) > 1:
            sch.vectorize(sch.split(last, [None, _vector_width(int(ext))])[1])
    return True


def _attempt(schedule: Callable[[Schedule], bool], sch: Schedule) -> Schedule | None:
    """schedule() on a copy of sch's function: the copy where it applies, None where it does not (or
    fails)."""
    trial = fresh_schedule(sch.mod["main"])
    try:
        return trial if schedule(trial) else None
    except Exception as e:  # noqa: BLE001 (ScheduleError: this schedule does not fit the function)
        log.debug("%s did not apply (%s)", schedule.__name__, str(e).splitlines()[0] if str(e) else e)
        return None


def schedule_primfuncs(mod: tvm.IRModule, tiles: TileChooser | None = None,
                       kernel: DotKernel | None = None) -> tvm.IRModule:
    """Schedule every PrimFunc of `mod` (after FuseTIR): dot convs tiled for `kernel` (the target's; None: no
    dot kernel), spatial kernels vectorized, others parallel. A function a schedule fails on is kept as it was
    (logged), so the build never fails because of this."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        sch = fresh_schedule(func)
        try:
            block = find_conv_block(sch)
            dw = find_conv_block(sch, DW_BLOCK)
            act = find_conv_block(sch, ACT_DOT_BLOCK)
            if act is not None and kernel is not None:
                if not schedule_act_dot(sch, act_kernel(kernel)):
                    continue  # not the function act_matmul_te builds: left as built
            elif block is not None and kernel is not None:
                sch = schedule_dot_conv(sch, block, tiles(name, sch) if tiles else None,
                                        kernel_of(sch, block, kernel))
            elif dw is not None:
                try:
                    sch = schedule_dw_conv(sch, dw)
                except Exception as e:  # noqa: BLE001 (a shape the tiling does not fit: outer loops in parallel)
                    log.debug("depthwise schedule of %s failed (%s); outer loops in parallel", name, e)
                    if not schedule_outer_parallel(sch):
                        continue
            elif not schedule_injective(sch):
                island = _attempt(schedule_row_island, sch)
                matmul = _attempt(schedule_int_matmul, sch) if island is None else None
                if island is not None:
                    sch = island
                elif matmul is not None:
                    sch = matmul
                elif not schedule_outer_parallel(sch):
                    continue
        except Exception as e:  # noqa: BLE001 (ScheduleError, TVM FFI errors: the function stays as built)
            log.warning("schedule of %s failed, left unscheduled: %s", name,
                        str(e).splitlines()[0] if str(e) else e)
            continue
        out[gv] = sch.mod["main"]
    return out
