"""Hand-written CPU schedules applied inside the build: fast integer kernels without tuning.

TVM's default CPU pipeline schedules nothing: every kernel runs single-threaded loops as legalized. This module
adds, around the default pipeline (see `scheduled_pipeline`):

1. before legalization, on x86 with AVX-512 VNNI and on aarch64 with dotprod: each integer NHWC conv2d becomes the
   packed-weight dot-product kernel of schedule_dot.py (`vpdpbusd`, `sdot`);
2. after FuseOps / FuseTIR, on every fused PrimFunc:
   - the dot conv: register tiling, tensorize, the fused epilogue computed per tile, parallel (n, oh) rows;
   - every other kernel made only of spatial blocks (pad, quantize, residual add, ...): intermediate blocks
     inlined where that cannot change a float result, the outer loops parallel, the inner loop vectorized.

Bit-exactness: the arithmetic of every block is unchanged. TVM compiles with LLVM's fp-contract=fast, so a float
multiply inlined into an add could become an FMA and round differently than the untuned build; `inline_safe`
refuses exactly that case. Integer arithmetic is exact in any order.

    >>> ex = tvm.compile(mod, target, relax_pipeline=scheduled_pipeline(target))
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from .schedule_dot import (
    DOT_BLOCK,
    DW_BLOCK,
    ConvTile,
    DotKernel,
    dot_kernel,
    kernel_of,
    rewrite_convs_dot,
    schedule_dot_conv,
    schedule_dw_conv,
)
from .targets import CompileTarget

__all__ = ["SCHEDULES", "graph_layout", "scheduled_pipeline", "find_conv_block", "inline_spatial",
           "parallel_vectorize", "fresh_schedule", "schedule_primfuncs", "inline_safe", "schedule_injective",
           "conv_funcs", "TileChooser"]

log = logging.getLogger(__name__)

SCHEDULES = ("default", "none")

# Elementwise kernels (pad + shift, residual adds outside a conv, quantize) are memory copies of a few KB per
# image. A parallel loop costs a thread-pool barrier per kernel, and on a loaded machine the barrier waits for a
# descheduled worker (milliseconds at batch 1); serial vectorized loops cost less at batch 1 and little at 64.
PARALLEL_ELEMENTWISE = False  # "default": the hand schedules of this module; "none": TVM's pipeline as is

# name of a fused PrimFunc -> its conv tile (None: the default tile); what tuning searches over
TileChooser = Callable[[str, Schedule], "ConvTile | None"]


def graph_layout(target: CompileTarget, schedule: str = "default") -> str:
    """The conv layout of the graph: NHWC where a dot kernel runs (x86 VNNI, aarch64 sdot), else the target's."""
    if schedule == "default" and dot_kernel(tvm.target.Target(target.tvm_target)) is not None:
        return "NHWC"
    return target.conv_layout


def _float(dtype: str) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _stored_value(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> tvm.ir.expr.Expr | None:
    body = sch.get(block).body
    return body.value if isinstance(body, tirx.BufferStore) else None


def inline_safe(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> bool:
    """Whether inlining `block` into its consumers keeps float results bit-identical: not when it computes a
    float product that a consumer adds or subtracts (LLVM would contract the pair into one FMA)."""
    value = _stored_value(sch, block)
    if value is None:
        return False
    if not (_float(str(value.ty)) and isinstance(value, tirx.Mul)):
        return True
    buf = sch.get(block).writes[0].source
    return not any(_adds_load_of(_stored_value(sch, c), buf) for c in sch.get_consumers(block))


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


def fresh_schedule(func: tirx.PrimFunc, global_symbol: str | None = None) -> Schedule:
    """A Schedule over a deep copy of `func`: TVM's schedule state edits the PrimFunc it is given in place."""
    func = tvm.ir.load_json(tvm.ir.save_json(func))
    if global_symbol:
        func = func.with_attr("global_symbol", global_symbol)
    return Schedule(tvm.IRModule({"main": func}))


def _spatial_only(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def inline_spatial(sch: Schedule, skip: frozenset | set = frozenset()) -> None:
    """Inline every spatial intermediate block (not writing a parameter) where inline_safe allows it."""
    root = sch.get_sblock("root")
    local = list(sch.get(root).alloc_buffers)  # intermediates; everything else is a parameter
    for blk in reversed(sch.get_child_blocks(root)):
        b = sch.get(blk)
        if b.name_hint in skip or not _spatial_only(sch, blk) or not sch.get_consumers(blk):
            continue
        if not all(any(w.source.same_as(x) for x in local) for w in b.writes):
            continue
        if inline_safe(sch, blk):
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001 (a block TVM cannot inline stays a block)
                pass


def parallel_vectorize(sch: Schedule, blk: tvm.s_tir.schedule.SBlockRV, max_vector: int = 64,
                       parallel: bool = True) -> None:
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


def schedule_injective(sch: Schedule) -> bool:
    """For a function made only of spatial blocks: inline the safe intermediates, then parallelize and vectorize
    every remaining block. Returns False, changing nothing, when the function has a reduction."""
    if not _has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks or not all(_spatial_only(sch, b) for b in blocks):
        return False
    inline_spatial(sch)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        parallel_vectorize(sch, blk, parallel=PARALLEL_ELEMENTWISE)
    return True


MIN_PARALLEL_WORK = 1 << 16  # iterations per image below which a reduction kernel stays serial


def _static_work(sch: Schedule, blk: tvm.s_tir.schedule.SBlockRV) -> int:
    """Iterations of `blk` per image: the product of its constant loop extents (the batch is symbolic)."""
    work = 1
    for lp in sch.get_loops(blk):
        ext = sch.get(lp).extent
        if isinstance(ext, tirx.IntImm):
            work *= int(ext)
    return work


def schedule_outer_parallel(sch: Schedule) -> bool:
    """Any other kernel (a conv the dot kernel does not take, a matmul, a mean): run the leading spatial loops of
    each block in parallel, the rest as built. The reduction order inside each output is untouched."""
    if not _has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if max(_static_work(sch, b) for b in blocks) < MIN_PARALLEL_WORK:
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
    columns vectorize; a few rows share each B row (unrolled); batch loops in parallel; the elementwise epilogue
    inlined and vectorized. Integer sums: any order gives the same result. False, changing nothing, for anything
    else (a float matmul keeps its order: the rounding would change)."""
    if not _has_root(sch):
        return False
    inline_spatial(sch)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks if not _spatial_only(sch, b)]
    if len(reductions) != 1 or not sch.get(reductions[0]).name_hint.startswith("matmul"):
        return False
    mm = reductions[0]
    ivs = sch.get(mm).iter_vars
    loops = sch.get_loops(mm)
    out_dtype = str(sch.get(mm).writes[0].source.dtype)
    if (len(loops) != len(ivs) or len(ivs) < 3 or ivs[-1].iter_type != tirx.IterVar.CommReduce
            or any(iv.iter_type != tirx.IterVar.DataPar for iv in ivs[:-1]) or not out_dtype.startswith("int")
            or _static_work(sch, mm) < MIN_PARALLEL_WORK):
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


def _has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # no block named root: a hand-written PrimFunc, leave it
        return False


def conv_funcs(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs in `mod` that hold a dot conv block."""
    names = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and DOT_BLOCK in func.script():
            names.append(gv.name_hint)
    return names


def find_conv_block(sch: Schedule, prefix: str = DOT_BLOCK) -> tvm.s_tir.schedule.SBlockRV | None:
    """The one block of `sch` named `prefix`... (the dot conv by default, DW_BLOCK for depthwise)."""
    if not _has_root(sch):
        return None
    found = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.startswith(prefix)]
    return found[0] if len(found) == 1 else None


def _attempt(schedule: Callable[[Schedule], bool], sch: Schedule) -> Schedule | None:
    """schedule() on a copy of sch's function: the copy where it applies, None where it does not (or fails)."""
    trial = fresh_schedule(sch.mod["main"])
    try:
        return trial if schedule(trial) else None
    except Exception as e:  # noqa: BLE001 (ScheduleError: this schedule does not fit the function)
        log.debug("%s did not apply (%s)", schedule.__name__, str(e).splitlines()[0] if str(e) else e)
        return None


def schedule_primfuncs(mod: tvm.IRModule, tiles: TileChooser | None = None,
                       kernel: DotKernel | None = None) -> tvm.IRModule:
    """Schedule every PrimFunc of `mod` (after FuseTIR): dot convs tiled, spatial kernels parallel/vectorized.
    A function a schedule fails on is kept as it was (logged), so the build never fails because of this."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        name = gv.name_hint
        sch = fresh_schedule(func)
        try:
            block = find_conv_block(sch)
            dw = find_conv_block(sch, DW_BLOCK)
            if block is not None and kernel is not None:
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
                matmul = _attempt(schedule_int_matmul, sch)
                if matmul is not None:
                    sch = matmul
                elif not schedule_outer_parallel(sch):
                    continue
        except Exception as e:  # noqa: BLE001 (ScheduleError, TVM FFI errors: the function stays as built)
            log.warning("schedule of %s failed, left unscheduled: %s", name, str(e).splitlines()[0] if str(e) else e)
            continue
        out[gv] = sch.mod["main"]
    return out


def _round_te(x: te.Tensor) -> te.Tensor:
    # llvm.nearbyint is what TVM emits for tirx.nearbyint; spelled as an LLVM intrinsic TVM's loop vectorizer
    # accepts it (it scalarizes tirx.nearbyint), so requantize epilogues vectorize. Same instruction, same bits.
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin(x.dtype, "llvm.nearbyint", x(*i)),
                      name="round_nearbyint")


def _legalize_round(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not str(call.args[0].ty.dtype).startswith("float"):
        return call.args[0]  # rounding an integer tensor is the identity
    return bb.call_te(_round_te, call.args[0], primfunc_name_hint="round")


def _default_legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _quantize_te(x: te.Tensor, s: float, zp: int, dtype: str) -> te.Tensor:
    # TVM's own quantize (x / s, round half to even, + zp, saturate) with the rounding as llvm.nearbyint, which
    # vectorizes (see _round_te); tirx.round made a float island's whole output loop scalar.
    lo, hi = (tirx.const(float(v.value), "float32") for v in (tirx.min_value(dtype), tirx.max_value(dtype)))

    def value(*i):
        r = tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint", x(*i) / tirx.const(s, "float32"))
        return te.max(te.min(r + tirx.const(float(zp), "float32"), hi), lo).astype(dtype)

    return te.compute(x.shape, value, name="quantized")


def _legalize_quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """A per-tensor float32 -> integer quantize (a float island's output) as _quantize_te; others as TVM does."""
    from ._common import scalar

    s, zp = scalar(call.args[1]), scalar(call.args[2])
    out = str(call.attrs.out_dtype)
    if s is None or zp is None or str(call.args[0].ty.dtype) != "float32" or "int" not in out:
        return _default_legalize(bb, call)
    return bb.call_te(_quantize_te, call.args[0], s=float(s), zp=int(zp), dtype=out, primfunc_name_hint="quantize")


def _legalize_erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """erf (GELU's) as TVM's vectorizable rational approximation (topi.fast_erf, float32): libm's erff, which the
    default lowering calls, is one scalar call per element and runs the whole loop around it scalar."""
    from tvm import topi

    if str(call.args[0].ty.dtype) != "float32":
        return _default_legalize(bb, call)
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


# Legalizations of this pipeline (both schedules: the same numbers from the scheduled and the unscheduled build).
CPU_LEGALIZE = {"relax.round": _legalize_round, "relax.quantize": _legalize_quantize, "relax.erf": _legalize_erf}


def _lrint_te(x: te.Tensor) -> te.Tensor:
    # Round half to even and convert in one instruction (vcvtps2dq / fcvtns): MXCSR / FPCR round to nearest even.
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin("int32", "llvm.lrint", x(*i)),
                      name="round_to_int32")


@relax.expr_functor.mutator
class _RoundToInt32(relax.PyExprMutator):
    """astype(round(y), "int32") -> llvm.lrint(y), where the float y is rounded only to be converted (the int32
    requantize tail, _common.round_to_int_tail). Where the conversion is defined (round(y) fits int32) the two
    give the same integers; LLVM does not fuse nearbyint and the conversion itself."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"
                and str(call.attrs.dtype) == "int32" and isinstance(call.args[0], relax.Var)):
            return call
        rounded = self.lookup_binding(call.args[0])
        if not (isinstance(rounded, relax.Call) and isinstance(rounded.op, tvm.ir.Op)
                and rounded.op.name == "relax.round" and str(rounded.args[0].ty.dtype) in ("float32", "float64")):
            return call
        return self.builder_.call_te(_lrint_te, rounded.args[0], primfunc_name_hint="round_to_int32")


def round_to_int32(mod: tvm.IRModule) -> tvm.IRModule:
    """_RoundToInt32 over every Relax function, then the rounds left unused are dropped."""
    return relax.transform.DeadCodeElimination()(_RoundToInt32(mod).transform())


def legalize_passes(target: tvm.target.Target) -> list:
    """TVM's CPU legalization passes minus FoldConstant (pack_int4 needs that), with CPU_LEGALIZE's lowerings:
    rounding as llvm.nearbyint, quantize vectorizable, erf as a rational approximation."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    out = []
    for p in cpu.legalize_passes(target):
        name = str(p.info.name)
        if "FoldConstant" in name:
            continue
        out.append(relax.transform.LegalizeOps(CPU_LEGALIZE) if name.endswith("LegalizeOps") else p)
    return out


def scheduled_pipeline(target: tvm.target.Target, tiles: TileChooser | None = None) -> tvm.transform.Pass:
    """TVM's default CPU pipeline minus FoldConstant (pack_int4 needs that), with the hand schedules added."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    legalize = legalize_passes(target)
    kernel = dot_kernel(target)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            if kernel is not None:
                mod, _ = rewrite_convs_dot(mod, kernel)
            mod = round_to_int32(mod)
            mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + legalize)(mod)
            mod = schedule_primfuncs(mod, tiles, kernel)
            seq = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline
