"""no_contraction.py: a float multiply-add built by TVM keeps both roundings once its product is fenced."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te

from .asm import fused_multiply_adds
from .no_contraction import FENCE, fence_float_products
from .targets import get_target


def _multiply_add(dtype: str, n: int = 256) -> tvm.IRModule:
    """c = a * b + d, the loop split by 16 and vectorized (what the schedules do to an elementwise kernel)."""
    a, b, d = (te.placeholder((n,), dtype, name) for name in "abd")
    c = te.compute((n,), lambda i: a[i] * b[i] + d[i], "c")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, d, c]))
    (i,) = sch.get_loops(sch.get_sblock("c"))
    sch.vectorize(sch.split(i, [None, 16])[1])
    return sch.mod


def _asm(mod: tvm.IRModule, target: str) -> tuple[tvm.runtime.Module, str]:
    lib = tvm.compile(mod, target=tvm.target.Target(get_target(target).tvm_target))
    return lib, lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


def _host_has_fma() -> bool:
    try:
        return " fma " in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("target", ["host", "arm64"])
def test_fenced_product_is_not_contracted_and_stays_vectorized(dtype, target):
    mod = _multiply_add(dtype)
    if target == "arm64" or _host_has_fma():  # the premise: unfenced, LLVM makes the FMA
        assert fused_multiply_adds(_asm(mod, target)[1])
    fenced = fence_float_products(mod)
    assert FENCE in fenced["main"].script()
    lib, asm = _asm(fenced, target)
    assert not fused_multiply_adds(asm)
    mul = r"\bvmulp[sd]\b" if target == "host" else r"\bfmul\s+v\d+\.[24][sd]"
    assert re.findall(mul, asm), "the fenced multiply is no longer vectorized"
    if target == "host":
        rng = np.random.default_rng(0)
        a, b, d = (rng.standard_normal(256).astype(dtype) for _ in range(3))
        out = tvm.runtime.tensor(np.zeros(256, dtype), tvm.cpu())
        lib["main"](*(tvm.runtime.tensor(v, tvm.cpu()) for v in (a, b, d)), out)
        assert np.array_equal(out.numpy(), a * b + d)  # numpy: the product rounded, then the sum


def test_fencing_twice_changes_nothing_and_integer_products_are_left_alone():
    once = fence_float_products(_multiply_add("float32"))
    tvm.ir.assert_structural_equal(fence_float_products(once), once)
    ints = _multiply_add("int32")
    tvm.ir.assert_structural_equal(fence_float_products(ints), ints)


def test_a_stored_product_is_fenced_where_it_is_stored():
    """t = a * b in its own block, c = t + d in the next: LLVM can forward t's store to its load in one loop."""
    a, b, d = (te.placeholder((64,), "float32", name) for name in "abd")
    t = te.compute((64,), lambda i: a[i] * b[i], "t")
    c = te.compute((64,), lambda i: t[i] + d[i], "c")
    fenced = fence_float_products(tvm.IRModule({"main": te.create_prim_func([a, b, d, c])}))
    assert fenced["main"].script().count(FENCE) == 1
