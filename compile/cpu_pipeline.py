"""The CPU build pipelines: TVM's default CPU pipeline minus FoldConstant, with this project's legalizations,
and (`scheduled_pipeline`) the dot-kernel rewrite and the hand schedules.

FoldConstant is left out of both: it would fold pack_int4's run-time unpack straight back into an int8
constant (constants are folded before packing instead, compiler.lower_for_target).

    >>> ex = tvm.compile(mod, t, relax_pipeline=scheduled_pipeline(t, target.kernel))
    >>> ex = tvm.compile(mod, t, relax_pipeline=build_pipeline(t))      # unscheduled, same numbers

`CPU_LEGALIZE` lowers rounding as llvm.nearbyint, a float island's quantize vectorizably and erf as a rational
approximation; both pipelines use it, so the scheduled and the unscheduled build compute the same numbers.
Both end with the float products an add reads fenced against FMA contraction (no_contraction.py).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu

from ._common import backend_pipeline, mutate_relax_functions, scalar
from .cpu_schedule import schedule_primfuncs
from .dot_instructions import DotKernel
from .dot_rewrite import rewrite_convs_dot
from .dot_schedule import TileChooser
from .lut_compose import compose_tables, mark_table_lookups
from .no_contraction import FenceFloatProducts, fence_float_products
from .row_islands import mark_row_reductions, narrow_row_max

__all__ = ["SCHEDULES", "CPU_LEGALIZE", "legalize_passes", "round_to_int32", "scheduled_pipeline",
           "build_pipeline"]

# "default": the hand schedules (cpu_schedule.py, dot_schedule.py); "none": TVM's kernels unscheduled
SCHEDULES = ("default", "none")


def _round_te(x: te.Tensor) -> te.Tensor:
    # llvm.nearbyint is what TVM emits for tirx.nearbyint; spelled as an LLVM intrinsic TVM's loop vectorizer
    # accepts it (it scalarizes tirx.nearbyint), so requantize epilogues vectorize. Same instruction, same
    # bits.
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin(x.dtype, "llvm.nearbyint", x(*i)),
                      name="round_nearbyint")


def _legalize_round(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    if not str(call.args[0].ty.dtype).startswith("float"):
        return call.args[0]  # rounding an integer tensor is the identity
    return bb.call_te(_round_te, call.args[0], primfunc_name_hint="round")


def _default_legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _quantize_te(x: te.Tensor, s: float, zp: int, dtype: str) -> te.Tensor:
    # TVM's own quantize (x / s, round half to even, + zp, saturate) with the rounding as llvm.nearbyint,
    # which vectorizes (see _round_te); tirx.round made a float island's whole output loop scalar.
    lo, hi = (tirx.const(float(v.value), "float32") for v in (tirx.min_value(dtype), tirx.max_value(dtype)))

    def value(*i):
        r = tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint", x(*i) / tirx.const(s, "float32"))
        return te.max(te.min(r + tirx.const(float(zp), "float32"), hi), lo).astype(dtype)

    return te.compute(x.shape, value, name="quantized")


def _legalize_quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """A per-tensor float32 -> integer quantize (a float island's output) as _quantize_te; others as TVM
    does."""
    s, zp = scalar(call.args[1]), scalar(call.args[2])
    out = str(call.attrs.out_dtype)
    if s is None or zp is None or str(call.args[0].ty.dtype) != "float32" or "int" not in out:
        return _default_legalize(bb, call)
    return bb.call_te(_quantize_te, call.args[0], s=float(s), zp=int(zp), dtype=out,
                      primfunc_name_hint="quantize")


def _legalize_erf(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """erf (GELU's) as TVM's vectorizable rational approximation (topi.fast_erf, float32): libm's erff, which
    the default lowering calls, is one scalar call per element and runs the whole loop around it scalar."""
    if str(call.args[0].ty.dtype) != "float32":
        return _default_legalize(bb, call)
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


# Legalizations of this pipeline (both schedules: the same numbers from the scheduled and the unscheduled
# build).
CPU_LEGALIZE = {"relax.round": _legalize_round, "relax.quantize": _legalize_quantize,
                "relax.erf": _legalize_erf}


def _lrint_te(x: te.Tensor) -> te.Tensor:
    # Round half to even and convert in one instruction (vcvtps2dq / fcvtns): MXCSR / FPCR round to nearest
    # even.
    return te.compute(x.shape, lambda *i: tirx.call_llvm_pure_intrin("int32", "llvm.lrint", x(*i)),
                      name="round_to_int32")


@relax.expr_functor.mutator
class _RoundToInt32(relax.PyExprMutator):
    """astype(round(y), "int32") -> llvm.lrint(y), where the float y is rounded only to be converted (the
    int32 requantize tail, _common.round_to_int_tail). Where the conversion is defined (round(y) fits int32)
    the two give the same integers; LLVM does not fuse nearbyint and the conversion itself."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"
                and str(call.attrs.dtype) == "int32" and isinstance(call.args[0], relax.Var)):
            return call
        rounded = self.lookup_binding(call.args[0])
        if not (isinstance(rounded, relax.Call) and isinstance(rounded.op, tvm.ir.Op)
                and rounded.op.name == "relax.round"
                and str(rounded.args[0].ty.dtype) in ("float32", "float64")):
            return call
        return self.builder_.call_te(_lrint_te, rounded.args[0], primfunc_name_hint="round_to_int32")


def round_to_int32(mod: tvm.IRModule) -> tvm.IRModule:
    """_RoundToInt32 over every Relax function, then the rounds left unused are dropped."""
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(_RoundToInt32(mod), mod))


def legalize_passes(target: tvm.target.Target, row_islands: bool = False) -> list:
    """TVM's CPU legalization passes minus FoldConstant (pack_int4 needs that), with CPU_LEGALIZE's lowerings:
    rounding as llvm.nearbyint, quantize vectorizable, erf as a rational approximation. `row_islands`: each
    Softmax / LayerNorm island fused into one kernel (row_islands.py; the scheduled pipeline)."""
    out = []
    for p in cpu.legalize_passes(target):
        name = str(p.info.name)
        if "FoldConstant" in name:
            continue
        out.append(relax.transform.LegalizeOps(CPU_LEGALIZE) if name.endswith("LegalizeOps") else p)
        if row_islands and name.endswith("AnnotateTIROpPattern"):
            out += [mark_row_reductions, mark_table_lookups]
    return out


def scheduled_pipeline(target: tvm.target.Target, kernel: DotKernel | None,
                       tiles: TileChooser | None = None) -> tvm.transform.Pass:
    """TVM's default CPU pipeline minus FoldConstant, with the hand schedules added: integer convs / matmuls
    on `kernel` (the target's, CompileTarget.kernel; None: no dot kernel), `tiles` the tuned conv tiles
    (tune.py)."""
    legalize = legalize_passes(target, row_islands=True)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            mod = narrow_row_max(compose_tables(mod))
            if kernel is not None:
                mod, _ = rewrite_convs_dot(mod, kernel)
            mod = round_to_int32(mod)
            mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + legalize)(mod)
            mod = fence_float_products(schedule_primfuncs(mod, tiles, kernel))
            seq = tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def build_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default CPU pipeline, unscheduled, minus FoldConstant (which would undo the packing); legalized
    as the scheduled pipeline is (legalize_passes), so both compute the same numbers."""
    return backend_pipeline(cpu, target, [*legalize_passes(target), FenceFloatProducts])
