"""Every float multiply rounded on its own: no FMA contraction in the CPU kernels.

TVM builds CPU code with LLVM's AllowFPOpFusion=Fast, so the backend may merge any float multiply with an add or
subtract that uses it into one fused multiply-add, which rounds once where the reference (numpy / torch, one
rounding per operation) rounds twice. Whether it does depends on what the schedule put next to what: an inlined
dequantize, a LayerNorm's (x - mean) / den * gamma + beta in a small model, a product kept in a register. One
different rounding before a round-to-integer is a different integer, so instead of steering schedules around it
every float product is wrapped in `llvm.arithmetic.fence`, the intrinsic LLVM defines to keep its operand intact
against contraction and reassociation. It costs no instruction (the fence is erased after instruction selection)
and does not stop vectorization; only the FMA goes, which the reference numerics do not have.

    >>> mod = fence_float_products(mod)     # TIR PrimFuncs of a Relax module, after scheduling
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx.op import call_llvm_pure_intrin

__all__ = ["FENCE", "fence_float_products", "FenceFloatProducts"]

FENCE = "llvm.arithmetic.fence"


def _is_fence(e: object) -> bool:
    return isinstance(e, tvm.ir.Call) and e.op.name == "tirx.call_llvm_pure_intrin" and \
        int(e.args[0]) == _fence_id()


_ID: list[int] = []


def _fence_id() -> int:
    if not _ID:
        from tvm.target import codegen

        _ID.append(int(codegen.llvm_lookup_intrinsic_id(FENCE)))
    return _ID[0]


def _fenced(e: tirx.Mul) -> tvm.ir.expr.Expr:
    return call_llvm_pure_intrin(str(e.ty), FENCE, e) if str(e.ty).startswith("float") else e


def _unnest(e: tvm.ir.Call) -> tvm.ir.expr.Expr:
    """fence(fence(x)) -> fence(x): a module fenced twice stays as it was."""
    return e.args[1] if _is_fence(e) and _is_fence(e.args[1]) else e


def fence_float_products(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with every float multiply in its TIR functions wrapped in the LLVM fence (Relax functions as they
    are)."""
    new = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new.update_func(gv, tvm_ffi.structural_map(func, [(tirx.Mul, _fenced), (tvm.ir.Call, _unnest)]))
    return new


@tvm.transform.module_pass(opt_level=0, name="FenceFloatProducts")
def FenceFloatProducts(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """fence_float_products as a pass (for a pipeline's list of passes)."""
    return fence_float_products(mod)
