"""Float products rounded on their own before an add: no FMA contraction in the CPU kernels.

TVM builds CPU code with LLVM's AllowFPOpFusion=Fast, so the backend may merge a float multiply with the add or
subtract that uses it into one fused multiply-add, which rounds once where the reference (numpy / torch, one
rounding per operation) rounds twice. Whether it does depends on what the schedule put next to what: an inlined
dequantize, a LayerNorm's (x - mean) / den * gamma + beta in a small model. One different rounding before a
round-to-integer is a different integer, so every float product that an add or subtract reads, directly or
through a buffer it is stored to (LLVM forwards a stored value to its load), is wrapped in
`llvm.arithmetic.fence`, the intrinsic LLVM defines to keep its operand intact against contraction. The fence is
no instruction, and loops TVM vectorizes stay vectorized; but LLVM's own loop vectorizer does not vectorize it,
and fencing every product (inside casts too) made the residual-add kernels 3-4x slower where TVM leaves the
vectorizing to LLVM (ViT-Tiny W8A8, batch 64, 2026-12-05); fenced as here, the same build's kernels sum to the
unfenced time within 0.5%. A product reaching an add through a variable is not seen; the assembly tests (no
FMA in any kernel of the tiny ViT, host and arm64) guard that.

    >>> mod = fence_float_products(mod)     # TIR PrimFuncs of a Relax module, after scheduling
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx.op import call_llvm_pure_intrin

__all__ = ["FENCE", "fence_float_products", "FenceFloatProducts"]

FENCE = "llvm.arithmetic.fence"


def _fence_products_in(e: tirx.Add | tirx.Sub) -> tvm.ir.expr.Expr:
    """a * b + c -> fence(a * b) + c for a float product (either operand; Sub alike). A fenced product is a call,
    not a product, so a module fenced twice stays as it was."""
    if not str(e.ty).startswith("float"):
        return e
    a, b = (call_llvm_pure_intrin(str(o.ty), FENCE, o) if isinstance(o, tirx.Mul) else o for o in (e.a, e.b))
    if a.same_as(e.a) and b.same_as(e.b):
        return e
    return type(e)(a, b)


def _fence_stored_product(st: tirx.BufferStore) -> tirx.BufferStore:
    """buf[i] = a * b -> buf[i] = fence(a * b): the add that loads it may be in the same loop, and LLVM forwards a
    stored value to a load of it."""
    v = st.value
    if not (isinstance(v, tirx.Mul) and str(v.ty).startswith("float")):
        return st
    return tirx.BufferStore(st.buffer, call_llvm_pure_intrin(str(v.ty), FENCE, v), st.indices, st.span)


_RULES = [((tirx.Add, tirx.Sub), _fence_products_in), (tirx.BufferStore, _fence_stored_product)]


def fence_float_products(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the float products of its TIR functions that an add or subtract reads, or that are stored,
    wrapped in the LLVM fence (Relax functions as they are)."""
    new = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new.update_func(gv, tvm_ffi.structural_map(func, _RULES))
    return new


@tvm.transform.module_pass(opt_level=0, name="FenceFloatProducts")
def FenceFloatProducts(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """fence_float_products as a pass (for a pipeline's list of passes)."""
    return fence_float_products(mod)
