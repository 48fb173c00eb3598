"""Rewrite the quantized residual Add (and Mul) into integer-in, integer-out elementwise arithmetic.

    quantize([relu](add|multiply(dequantize(a_q, s_a, zp_a), dequantize(b_q, s_b, zp_b))), s_y, zp_y)

requant="float" / "float64" (default; bit-exact with Plateau's reference and the QDQ graph):

    y = float32(a_q - zp_a) * s_a  (+|*)  float32(b_q - zp_b) * s_b          float32, in this order
    out = saturate(round_half_even(y / s_y) + zp_y)                            lower bound zp_y with a ReLU

    This is the reference's own formula (export.quantize.run_graph_int) on the integers, fused into one
    kernel: no float tensor is stored between layers.

requant="fixed" (integer-only devices; differs from the reference only on near-ties):

    add: acc = (a_q - zp_a) * M_a + (b_q - zp_b) * M_b   in int64, M = round(s / s_y * 2^k), one shared k
         out = ((acc + 2^(k-1)) >> k) + zp_y
    mul: acc = (a_q - zp_a) * (b_q - zp_b)   exact in int32, then the fixed-point requantize of conv layers
         with the multiplier s_a * s_b / s_y.

Per-tensor parameters only; the rewriter returns the expression unchanged otherwise.
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ._common import (
    Multiplier,
    dequantize_f32,
    dequantized_values,
    per_tensor,
    qtype_of,
    quantize_f32,
    requantize,
)
from .rewrite_registry import register_rewrite

__all__ = ["BinaryRewrite", "fixed_add_multipliers"]

_OPS = {"relax.add": "add", "relax.multiply": "multiply"}


def fixed_add_multipliers(m_a: float, m_b: float) -> tuple[int, int, int]:
    """(M_a, M_b, k) with M = round(m * 2^k) < 2^31: the largest k that keeps both multipliers in 31 bits."""
    k = 30 - int(np.floor(np.log2(max(m_a, m_b))))
    k = min(k, 62)
    m_ai, m_bi = int(np.rint(np.float64(m_a) * 2.0**k)), int(np.rint(np.float64(m_b) * 2.0**k))
    if k < 1 or max(m_ai, m_bi) >= 2**31:
        raise ValueError(f"add multipliers {m_a}, {m_b} are outside the fixed-point range")
    return m_ai, m_bi, k


@register_rewrite("binary", phase="compute", order=60)
class BinaryRewrite:
    """Pattern and rewriter for add / multiply of two per-tensor quantized tensors, re-quantized after."""

    def __init__(self, requant: str = "float") -> None:
        self.requant = requant
        self.a_q, self.s_a, self.zp_a = wildcard(), is_const(), is_const()
        self.b_q, self.s_b, self.zp_b = wildcard(), is_const(), is_const()
        self.s_y, self.zp_y = is_const(), is_const()
        a = is_op("relax.dequantize")(self.a_q, self.s_a, self.zp_a)
        b = is_op("relax.dequantize")(self.b_q, self.s_b, self.zp_b)
        self.binop = is_op("relax.add")(a, b) | is_op("relax.multiply")(a, b)
        self.relu = is_op("relax.nn.relu")(self.binop)
        self.quant = is_op("relax.quantize")(self.relu | self.binop, self.s_y, self.zp_y)
        self.pattern = self.quant

    def __call__(self, expr: relax.Expr, m: dict) -> relax.Expr:
        a_q, b_q = m[self.a_q], m[self.b_q]
        pa, pb = per_tensor(m[self.s_a], m[self.zp_a]), per_tensor(m[self.s_b], m[self.zp_b])
        py = per_tensor(m[self.s_y], m[self.zp_y])
        out_t = qtype_of(m[self.quant].attrs.out_dtype)
        if None in (pa, pb, py, out_t, qtype_of(a_q.ty.dtype), qtype_of(b_q.ty.dtype)):
            return expr
        kind = _OPS[m[self.binop].op.name]
        lo = max(out_t.qmin, py[1]) if self.relu in m else out_t.qmin
        if self.requant != "fixed":
            add = kind == "add"
            y = getattr(relax.op, kind)(dequantize_f32(a_q, *pa, summed=add), dequantize_f32(b_q, *pb, summed=add))
            ya = dequantized_values(qtype_of(a_q.ty.dtype), *pa)
            yb = dequantized_values(qtype_of(b_q.ty.dtype), *pb)
            with np.errstate(over="ignore"):  # every value y can take, in float32 as the kernel computes it
                domain = ya[:, None] + yb[None, :] if kind == "add" else ya[:, None] * yb[None, :]
            return quantize_f32(y, *py, out_t, lo, domain=domain)
        if kind == "multiply":
            prod = relax.op.multiply(_centered(a_q, pa[1]), _centered(b_q, pb[1]))
            mult = Multiplier.for_product(pa[0], np.asarray([pb[0]]), py[0])
            return requantize(prod, mult, py[1], out_t, lo, (), "fixed")
        return _fixed_add(a_q, b_q, pa, pb, py, out_t, lo)


def _centered(q: relax.Expr, zp: int) -> relax.Expr:
    return relax.op.subtract(relax.op.astype(q, "int32"), relax.const(np.int32(zp), "int32"))


def _fixed_add(a_q, b_q, pa, pb, py, out_t, lo) -> relax.Expr:
    op = relax.op
    i64 = lambda v: relax.const(np.asarray(v, np.int64), "int64")  # noqa: E731  (relax.const narrows 0-d ints)
    m_a = np.float64(pa[0]) / np.float64(py[0])
    m_b = np.float64(pb[0]) / np.float64(py[0])
    ma, mb, k = fixed_add_multipliers(m_a, m_b)
    acc = op.add(op.multiply(op.astype(_centered(a_q, pa[1]), "int64"), i64(ma)),
                 op.multiply(op.astype(_centered(b_q, pb[1]), "int64"), i64(mb)))
    q = op.add(op.right_shift(op.add(acc, i64(1 << (k - 1))), i64(k)), i64(py[1]))
    return op.astype(op.minimum(op.maximum(q, i64(lo)), i64(out_t.qmax)), out_t.np_dtype.name)
