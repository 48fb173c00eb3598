"""Store 4-bit weights two per byte in the library and unpack them at run time.

After lowering, every integer conv2d / matmul weight is an int8 constant. One whose values all fit in -8..7
(4-bit weights, or any weight that happens to) is replaced by a uint8 constant of half the size and a chain of
elementwise ops that restores it:

    packed[i] = (w[2i] & 0xF) | (w[2i+1] << 4)                       (at compile time, numpy)
    w = ((stack([packed & 0xF, packed >> 4], -1) as int8) ^ 8) - 8    (at run time: sign-extends the nibbles)

The unpack runs once per inference as one fused elementwise kernel over the weights; the conv itself still
reads int8 (so +dotprod still gives sdot). TVM's native int4 buffers are not used: they are miscompiled
(shared notes). The nibbles are plateau.quant's (pack_int4 / unpack_int4, ONNX's INT4 order). The default
pipeline's FoldConstant would fold the unpack straight back into an int8 constant, so the CPU pipelines
(cpu_pipeline.py) leave it out; constants are folded before packing instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from plateau.quant import pack_int4, unpack_int4

from ._common import const_np

__all__ = ["pack_int4_weights", "packed_weight_bytes", "MIN_PACK_VALUES", "unpacked_value", "packed_int4"]

MIN_PACK_VALUES = 32  # smaller weights are not worth an extra kernel launch


def _unpack(packed: relax.Expr, shape: tuple[int, ...], n: int) -> relax.Expr:
    op = relax.op
    lo = op.bitwise_and(packed, relax.const(np.uint8(0xF), "uint8"))
    hi = op.right_shift(packed, relax.const(np.uint8(4), "uint8"))
    nibbles = op.reshape(op.stack([lo, hi], axis=-1), (2 * int(packed.ty.shape[0]),))
    if 2 * int(packed.ty.shape[0]) != n:
        nibbles = op.strided_slice(nibbles, axes=[0], begin=[0], end=[n])
    v = op.astype(nibbles, "int8")
    signed = op.subtract(op.bitwise_xor(v, relax.const(np.int8(8), "int8")), relax.const(np.int8(8), "int8"))
    return op.reshape(signed, shape)


def packed_int4(w: np.ndarray) -> relax.Expr:
    """The run-time unpack expression of int8 values `w` (all in -8..7), stored two per byte."""
    packed = relax.const(pack_int4(w), "uint8")
    return _unpack(packed, tuple(w.shape), w.size)


# the unpack chain of _unpack, outermost first (strided_slice only when the count is odd)
_CHAIN = ("relax.reshape", "relax.subtract", "relax.bitwise_xor", "relax.astype")


def unpacked_value(expr: relax.Expr, lookup: Callable[[relax.Var], relax.Expr | None]) -> np.ndarray | None:
    """The int8 weight an unpack expression of pack_int4_weights restores, read at compile time from its
    packed constant, or None when `expr` is not one. `lookup(var)` gives the value bound to a var (a mutator's
    lookup_binding)."""
    def follow(e: relax.Expr) -> relax.Expr:
        while isinstance(e, relax.Var):
            bound = lookup(e)
            if bound is None:
                return e
            e = bound
        return e

    def name(e: relax.Expr) -> str:
        return getattr(getattr(e, "op", None), "name", "")

    e = follow(expr)
    shape_expr = e
    for op in _CHAIN:
        if name(e) != op:
            return None
        e = follow(e.args[0])
    if name(e) == "relax.strided_slice":
        e = follow(e.args[0])
    if name(e) != "relax.reshape" or name(follow(e.args[0])) != "relax.stack":
        return None
    stacked = follow(e.args[0]).args[0]
    lo = follow(stacked.fields[0]) if isinstance(stacked, relax.Tuple) else None
    if lo is None or name(lo) != "relax.bitwise_and":
        return None
    packed = const_np(lo.args[0])
    shape = [int(d) for d in shape_expr.ty.shape]
    n = int(np.prod(shape))
    if packed is None or packed.dtype != np.uint8 or 2 * packed.size < n:
        return None
    return unpack_int4(packed, n).reshape(shape)


def pack_int4_weights(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace each packable int8 conv2d / matmul weight constant by packed bytes + an unpack (see module
    doc)."""
    data, weight = wildcard(), is_const()
    pattern = is_op("relax.nn.conv2d")(data, weight) | is_op("relax.matmul")(data, weight)

    def rewriter(expr: relax.Call, m: dict) -> relax.Expr:
        w = const_np(m[weight])
        if w is None or w.dtype != np.int8 or w.size < MIN_PACK_VALUES or w.min() < -8 or w.max() > 7:
            return expr
        return relax.Call(expr.op, [expr.args[0], packed_int4(w)], expr.attrs)

    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = rewrite_call(pattern, rewriter, func)
    return out


def packed_weight_bytes(mod: tvm.IRModule) -> tuple[int, int]:
    """(bytes of conv2d / matmul weights as the library stores them, how many of those weights are packed)."""
    total = packed = 0
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for b in block.bindings:
                call = b.value
                name = getattr(getattr(call, "op", None), "name", "")
                arg = call.args[1] if name in ("relax.nn.conv2d", "relax.matmul") else (
                    call.args[0] if name == "relax.bitwise_and" else None)
                w = const_np(arg) if arg is not None else None
                if w is not None and w.dtype in (np.int8, np.uint8):
                    total += w.nbytes
                    packed += name == "relax.bitwise_and"
    return total, packed
