"""Move a per-tensor quantize above the data-movement op before it, so the compute op under that op meets its own
quantize (a transformer's Linear on token rows: Reshape -> Gemm -> Reshape -> QuantizeLinear).

    quantize(op(y), s, zp)   =>   op(quantize(y, s, zp))

for op in reshape, flatten, permute_dims, squeeze and expand_dims: they only move values, and quantize acts on
each value alone, so the two orders give the same integers. The conv / matmul patterns then see
quantize(matmul(...)) and lower it; the reshape runs on the integers.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import const_np, per_tensor
from .rewrite_registry import register_rewrite

__all__ = ["QuantizeUpRewrite", "MOVES"]

MOVES = ("relax.reshape", "relax.flatten", "relax.permute_dims", "relax.squeeze", "relax.expand_dims")


@register_rewrite("quantize_up", phase="pre", order=30)
class QuantizeUpRewrite:
    """Pattern and rewriter: a per-tensor quantize of a moved float tensor."""

    def __init__(self, requant: str = "float") -> None:
        del requant  # exact in every mode: no arithmetic on values
        self.y, self.s, self.zp = wildcard(), is_const(), is_const()
        moves = [is_op(name)(self.y, varg_default_wildcard=True) for name in MOVES]
        moved = moves[0]
        for p in moves[1:]:
            moved = moved | p
        self.moved = moved
        self.pattern = is_op("relax.quantize")(moved, self.s, self.zp)

    def __call__(self, expr: relax.Call, m: dict) -> relax.Expr:
        if per_tensor(m[self.s], m[self.zp]) is None:
            return expr  # per-axis parameters belong to an axis the move would shift
        y, move = m[self.y], m[self.moved]
        if str(y.ty.dtype) != "float32" or const_np(y) is not None:
            return expr
        q = relax.op.quantize(y, expr.args[1], expr.args[2], axis=int(expr.attrs.axis),
                              out_dtype=str(expr.attrs.out_dtype))
        return relax.Call(move.op, [q, *move.args[1:]], move.attrs, move.ty_args)
