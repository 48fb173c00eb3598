"""Divide by a power of two as a multiply: x / 2^k == x * 2^-k exactly in binary floating point (both are the same
scaling of the exponent), so the division, several times a multiply's cost in a vector unit, is replaced where its
divisor is a constant power of two. The exact Softmax island ends in one: its probabilities sit on the fixed 2^-8
grid, so (e / S) / 2^-8 becomes (e / S) * 256. (LLVM makes this change itself only for a literal divisor; TVM
passes the constant as a buffer.)

    >>> mod = divide_by_powers_of_two(mod)    # Relax, after FoldConstant
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ._common import mutate_relax_functions, scalar

__all__ = ["divide_by_powers_of_two"]


def _power_of_two(v: np.generic) -> bool:
    if not np.issubdtype(np.asarray(v).dtype, np.floating) or not np.isfinite(v) or v == 0:
        return False
    mantissa, _ = np.frexp(v)
    return abs(float(mantissa)) == 0.5


@relax.expr_functor.mutator
class _PowerOfTwoDivision(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.divide"):
            return call
        d = scalar(call.args[1])
        dtype = str(getattr(call.args[0].ty, "dtype", ""))
        if d is None or dtype not in ("float32", "float64") or str(np.asarray(d).dtype) != dtype:
            return call
        if not _power_of_two(d):
            return call
        inv = np.asarray(1, dtype) / np.asarray(d, dtype)
        if not (np.isfinite(inv) and _power_of_two(inv)):  # 1 / 2^k is a power of two unless it overflows
            return call
        return relax.op.multiply(call.args[0], relax.const(inv, dtype))


def divide_by_powers_of_two(mod: tvm.IRModule) -> tvm.IRModule:
    """Every float division by a constant power of two replaced by the multiply by its (exact) reciprocal."""
    return mutate_relax_functions(_PowerOfTwoDivision(mod), mod)
