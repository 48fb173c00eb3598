"""exact_division.divide_by_powers_of_two: x / 2^k becomes x * 2^-k (the same float for every x, subnormal results
included); any other divisor stays a division."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile.exact_division import divide_by_powers_of_two

RNG = np.random.default_rng(3)


def _divide(divisor: float, dtype: str) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4096,), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.divide(x, relax.const(np.asarray(divisor, dtype), dtype)))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod: tvm.IRModule) -> set[str]:
    names: set[str] = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and names.add(e.op.name))
    return names


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("divisor", [2.0**-8, 2.0**10, 0.5, -4.0])
def test_power_of_two_divisor_becomes_a_multiply_with_the_same_results(dtype, divisor):
    tiny = np.finfo(dtype).tiny
    x = np.concatenate([RNG.standard_normal(2048) * 1e3, RNG.standard_normal(2040) * tiny * 64,  # subnormal results
                        [0.0, -0.0, np.inf, -np.inf, tiny, -tiny, np.finfo(dtype).max, 1.0]]).astype(dtype)
    mod = divide_by_powers_of_two(_divide(divisor, dtype))
    assert "relax.divide" not in _ops(mod) and "relax.multiply" in _ops(mod)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(_run(mod, x), x / np.asarray(divisor, dtype))


@pytest.mark.parametrize("divisor", [0.1, 3.0, 2.0**-8 * 1.5])
def test_other_divisors_stay_divisions(divisor):
    assert "relax.divide" in _ops(divide_by_powers_of_two(_divide(divisor, "float64")))
