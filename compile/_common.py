"""Helpers shared by the integer-lowering rewrites: reading constants and emitting the requantize tail.

The requantize step follows onnxruntime's MLAS kernels (QLinearConv / QGemm): the int32 accumulator is converted
to float32, multiplied by a float32 per-channel multiplier (s_x * s_w) / s_y, clamped, rounded half to even and
offset by the output zero point. Clamping before or after rounding gives the same integers, so we round first.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from plateau.quant import QType, requant_multiplier

__all__ = ["const_np", "scalar", "qtype_of", "multiplier", "requantize", "REQUANT_MODES"]

REQUANT_MODES = ("float", "fixed")


def const_np(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a relax constant, or None when `expr` is not a constant."""
    value = getattr(expr, "value", None)
    if value is None or not hasattr(value, "numpy"):
        return None
    return value.numpy()


def scalar(expr: relax.Expr) -> np.generic | None:
    """The value of a constant holding exactly one element (scalar or shape [1]), else None."""
    a = const_np(expr)
    if a is None or a.size != 1:
        return None
    return a.reshape(())[()]


def qtype_of(dtype: str) -> QType | None:
    """The integer type of a quantized tensor dtype; None for types we do not lower (int16, float8, ...)."""
    return {"int8": QType(8, True), "uint8": QType(8, False)}.get(str(dtype))


def multiplier(s_x: np.floating, s_w: np.ndarray, s_y: np.floating) -> np.ndarray:
    """Per-channel float32 requantize multiplier, in onnxruntime's order of float32 operations."""
    s_xw = (np.float32(s_x) * np.asarray(s_w, dtype=np.float32)).astype(np.float32)
    return (s_xw / np.float32(s_y)).astype(np.float32)


def requantize(
    acc: relax.Expr,
    mult: np.ndarray,
    zp_y: int,
    out: QType,
    lo: int,
    chan_shape: tuple[int, ...],
    mode: str = "float",
) -> relax.Expr:
    """int32 accumulator -> quantized output of type `out`, saturated to [lo, out.qmax].

    `chan_shape` broadcasts the per-channel multiplier against the accumulator ((1, C, 1, 1) for NCHW conv,
    (C,) for matmul). `lo` is out.qmin, or max(out.qmin, zp_y) when a ReLU was folded in.
    """
    op = relax.op
    m = np.broadcast_to(mult, (int(np.prod(chan_shape)),)).reshape(chan_shape).astype(np.float32)
    if mode == "float":
        # float32(acc) * M, round half to even (TVM's round lowers to llvm.nearbyint), + zp, clip, cast.
        f = op.multiply(op.astype(acc, "float32"), relax.const(m))
        r = op.add(op.round(f), relax.const(np.float32(zp_y)))
        # maximum/minimum with scalar constants (not clip) so ConvertLayout can carry NHWC through the tail.
        c = op.minimum(op.maximum(r, relax.const(np.float32(lo))), relax.const(np.float32(out.qmax)))
        return op.astype(c, out.np_dtype.name)
    if mode == "fixed":
        return _requantize_fixed(acc, m, zp_y, out, lo)
    raise AssertionError(f"unknown requant mode {mode!r}")


def _requantize_fixed(acc: relax.Expr, m: np.ndarray, zp_y: int, out: QType, lo: int) -> relax.Expr:
    """Integer-only requantize: (acc * mult + round) >> (31 + shift), in int64, ties rounded up.

    This is what integer-only devices do (gemmlowp style, with a single rounding); it can differ from the
    float path by one step on exact ties, so it is an option, not the default.
    """
    op = relax.op
    mult, shift = requant_multiplier(m.astype(np.float64))
    total = (31 + shift.astype(np.int64)).reshape(m.shape)
    assert np.all(total >= 1) and np.all(total <= 62), "requantize multiplier out of the fixed-point range"
    prod = op.multiply(op.astype(acc, "int64"), relax.const(mult.astype(np.int64).reshape(m.shape)))
    rounded = op.add(prod, relax.const((np.int64(1) << (total - 1)).astype(np.int64)))
    shifted = op.right_shift(rounded, relax.const(total.astype(np.int64)))
    q = op.add(shifted, relax.const(np.int64(zp_y)))
    c = op.minimum(op.maximum(q, relax.const(np.int64(lo))), relax.const(np.int64(out.qmax)))
    return op.astype(c, out.np_dtype.name)
