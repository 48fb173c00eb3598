"""Move a per-tensor dequantize below the data-movement ops and max pooling that follow it, so they run on
integers.

    op(dequantize(x_q, s, zp), ...)   =>   dequantize(op'(x_q, ...), s, zp)

for op in reshape, flatten, permute_dims (Transpose), squeeze, expand_dims, strided_slice (Slice), take (Gather),
max_pool2d, pad (constant 0 becomes constant zp) and relu (becomes maximum(x_q, zp)). Each is exact: these ops move,
select or compare values, and dequantize is monotone increasing, so max and ReLU commute with it; MaxPool's
padding (the dtype minimum on integers, -inf in float) never wins a window that holds a real element.

Once the dequantize sits below them, a following quantize with the same parameters cancels it
(rewrite_requant) and the next conv / matmul pattern sees dequantize(x_q) directly. Per-axis dequantize is
left alone: moving it through a reshape or transpose would change which axis its scales belong to.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import const_np, per_tensor
from .rewrite_registry import register_rewrite

__all__ = ["PassThroughRewrite", "PASS_THROUGH_OPS"]

PASS_THROUGH_OPS = (
    "relax.reshape", "relax.flatten", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
    "relax.strided_slice", "relax.take", "relax.nn.max_pool2d", "relax.nn.pad", "relax.nn.relu",
)


@register_rewrite("passthrough", phase="pre", order=10)
class PassThroughRewrite:
    """Pattern and rewriter: one pass-through op applied to a per-tensor dequantized integer tensor."""

    def __init__(self, requant: str = "float") -> None:
        del requant  # exact in every mode: no arithmetic on values
        self.x_q, self.s, self.zp = wildcard(), is_const(), is_const()
        self.deq = is_op("relax.dequantize")(self.x_q, self.s, self.zp)
        ops = [is_op(name)(self.deq, varg_default_wildcard=True) for name in PASS_THROUGH_OPS]
        self.pattern = ops[0]
        for p in ops[1:]:
            self.pattern = self.pattern | p

    def __call__(self, expr: relax.Call, m: dict) -> relax.Expr:
        params = per_tensor(m[self.s], m[self.zp])
        deq = m[self.deq]
        x_q = m[self.x_q]
        if params is None or str(deq.attrs.out_dtype) != "float32" or const_np(x_q) is not None:
            return expr  # constants (weights, biases) are left to the conv / matmul patterns and FoldConstant
        zp = params[1]
        name = expr.op.name
        if name == "relax.nn.relu":
            dt = str(x_q.ty.dtype)
            moved = relax.op.maximum(x_q, relax.const(np.asarray(zp, dt), dt))
        elif name == "relax.nn.pad":
            a = expr.attrs
            if str(a.pad_mode) != "constant" or float(a.pad_value) != 0.0:
                return expr  # a non-zero pad value is not on the integer grid in general
            moved = relax.op.nn.pad(x_q, [int(p) for p in a.pad_width], pad_value=float(zp),
                                    pad_mode="constant")
        else:
            moved = relax.Call(expr.op, [x_q, *expr.args[1:]], expr.attrs, expr.ty_args)
        return relax.op.dequantize(moved, deq.args[1], deq.args[2], axis=int(deq.attrs.axis),
                                   out_dtype="float32")
