"""Cast a clamped float to its integer type in one step: drop the wrap-around TVM's ONNX importer builds around
every float -> integer Cast.

TVM's importer gives Cast(float -> int8) a defined result for any input: non-finite values become 0, then the
value is cast to int32, masked to 8 bits and sign-wrapped (isfinite, logical_not, where, astype, bitwise_and,
greater_equal, subtract, where, astype). The exact LayerNorm and Softmax islands end in exactly that Cast after a
Clip to the output type's range, where every one of those steps is the identity; in the island kernels they cost
about as much as the normalization itself (all in 64-bit lanes).

    astype(wrap(astype(where(!isfinite(x), 0, x), int32)), int8)   =>   astype(x, int8)
    when x = minimum(maximum(y, lo), hi) with constants int8.min <= lo <= hi <= int8.max

Same integers for every finite y: the truncation of a value in [lo, hi] is in the type's range, where the mask and
the wrap change nothing. A NaN y is the one difference (0 before, unspecified now); ONNX leaves the Cast of a NaN
to an integer undefined as well, and the islands that end in this Cast divide by positive sums (no NaN).
Runs after FoldConstant (the importer's Clip bounds are where(isnan(c), -inf, c) until then).

    >>> mod = drop_cast_wraps(mod)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from ._common import mutate_relax_functions, scalar
from .tir_helpers import fresh_schedule, has_root

__all__ = ["drop_cast_wraps"]


def _op(call: relax.Expr) -> str | None:
    return call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else None


@relax.expr_functor.mutator
class _DropCastWraps(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def _binding(self, expr: relax.Expr) -> relax.Expr | None:
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else None

    def _bound(self, expr: relax.Expr, op: str) -> relax.Call | None:
        """The call bound to the variable `expr` when it is a call of `op`."""
        b = self._binding(expr)
        return b if _op(b) == op else None

    def _elementwise(self, expr: relax.Expr) -> tuple[str, relax.Expr, float] | None:
        """('min' | 'max', tensor, scalar constant) when `expr` is an elementwise minimum / maximum with a constant
        (the relax op, or the call_tir of topi's kernel that the ONNX importer emits for Clip)."""
        b = self._binding(expr)
        if _op(b) in ("relax.minimum", "relax.maximum"):
            kind, args = _op(b)[6:9], list(b.args)
        elif _op(b) == "relax.call_tir" and isinstance(b.args[0], tvm.ir.GlobalVar):
            kind, args = _min_or_max(self.mod[b.args[0]]), list(b.args[1].fields)
        else:
            return None
        c = scalar(args[1]) if len(args) == 2 else None
        return None if kind is None or c is None else (kind, args[0], float(c))

    def _range(self, x: relax.Expr) -> tuple[float, float] | None:
        hi = self._elementwise(x)
        lo = self._elementwise(hi[1]) if hi is not None and hi[0] == "min" else None
        return None if lo is None or lo[0] != "max" else (lo[2], hi[2])

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if _op(call) != "relax.astype":
            return call
        dst = np.dtype(str(call.attrs.dtype))
        if dst.kind not in "iu" or dst.itemsize >= 4:
            return call
        info, mask = np.iinfo(dst), (1 << (8 * dst.itemsize)) - 1
        low = call.args[0]
        if dst.kind == "i":  # where(low >= half, low - 2^bits, low)
            wrap = self._bound(low, "relax.where")
            ge = self._bound(wrap.args[0], "relax.greater_equal") if wrap is not None else None
            if ge is None or scalar(ge.args[1]) != -int(info.min) or not wrap.args[2].same_as(ge.args[0]):
                return call
            low = ge.args[0]
        masked = self._bound(low, "relax.bitwise_and")
        wide = self._bound(masked.args[0], "relax.astype") if masked is not None else None
        if wide is None or scalar(masked.args[1]) != mask:
            return call
        finite = self._bound(wide.args[0], "relax.where")
        if finite is None or scalar(finite.args[1]) != 0:
            return call
        nan_test = self._bound(finite.args[0], "relax.logical_not")
        is_finite = self._bound(nan_test.args[0], "relax.isfinite") if nan_test is not None else None
        x = finite.args[2]
        if is_finite is None or not is_finite.args[0].same_as(x):
            return call
        bounds = self._range(x)
        if bounds is None or not (info.min <= bounds[0] <= bounds[1] <= info.max):
            return call
        return relax.op.astype(x, str(dst))


def _min_or_max(func: object) -> str | None:
    """'min' / 'max' when `func` is a PrimFunc of one block storing T.min / T.max of its two inputs' loads."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = fresh_schedule(func)
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    body = sch.get(blocks[0]).body if len(blocks) == 1 else None
    if not isinstance(body, tirx.BufferStore):
        return None
    return {tirx.Min: "min", tirx.Max: "max"}.get(type(body.value))


def drop_cast_wraps(mod: tvm.IRModule) -> tvm.IRModule:
    """Every importer-wrapped float -> 8/16-bit Cast of a value clamped into the type replaced by one astype."""
    return mutate_relax_functions(_DropCastWraps(mod), mod)
