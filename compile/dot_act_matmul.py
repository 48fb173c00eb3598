"""Attention's matmuls of two activations (Q.K^T and P.V) on the dot-product instructions.

After act_matmul's rewrite a matmul of two quantized activations is

    matmul(int32(a) - za, int32(b) - zb) -> int32,      a [..., M, K], b [..., K, N], int8 or uint8

TVM's generic integer matmul runs it at a few GMAC/s. Here it becomes one kernel per call: per (batch, head)
the right operand is packed like a conv weight, [N/L, K/k, L, k] (L output lanes x k bytes of one
instruction, dot_instructions.py), the left one shifted to the instruction's byte type, and a register tile
of rows x L*oc columns reduced with the instruction. With a' = a + sa and b' = b + sb (the shifts that reach
the instruction's types: +128 takes int8 to uint8 for vpdpbusd, -128 uint8 to int8 for sdot)

    sum_c (a - za)(b - zb) = sum_c a'b' - zb' * sum_c a' - za' * sum_c b' + K * za' * zb'

with za' = za + sa, zb' = zb + sb: the row and column sums are per-head vectors, the last term a constant.
Rows and columns are padded to whole tiles with zeros (a zero byte on either side adds nothing to any sum)
and the padded outputs are never stored. Integer arithmetic throughout: the result equals the generic
matmul's bit for bit.

    >>> found = act_matmul_operands(call, lookup)      # (a, b, za, zb) or None
    >>> out = bb.call_te(partial(act_matmul_te, za=za, zb=zb, kernel=kernel), a, b)
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from ._common import const_np
from .dot_instructions import SDOT, DotKernel, byte_shift
from .tir_helpers import has_root, inline_spatial

__all__ = ["ACT_DOT_BLOCK", "ACT_ROWS", "act_kernel", "act_tile", "act_matmul_operands", "act_matmul_te",
           "schedule_act_dot"]

ACT_DOT_BLOCK = "plateau_act_dot"  # the dot block's name: schedule_primfuncs finds the kernel by it
ACT_ROWS = 4  # output rows per register tile: each packed weight vector feeds 4 instructions


def act_kernel(kernel: DotKernel) -> DotKernel:
    """The one-pixel instruction these kernels use: the target's, or sdot where the target's is smmla (whose
    pixel pairs need two rows one stride apart; every i8mm CPU has dotprod)."""
    return kernel if kernel.pixels == 1 else SDOT


def act_tile(n: int, kernel: DotKernel) -> int:
    """Blocks of L columns per register tile: all N columns in one tile where the registers hold them
    (ACT_ROWS x oc accumulators within the kernel's budget)."""
    return max(1, min(-(-n // kernel.lanes), kernel.registers // ACT_ROWS))


def _centered(expr: relax.Expr, lookup) -> tuple[relax.Expr, int] | None:
    """(x, zp) when expr is int32(x) - zp or int32(x) with x an int8/uint8 tensor, else None."""
    zp = 0
    call = lookup(expr) if isinstance(expr, relax.Var) else expr
    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.subtract":
        z = const_np(call.args[1])
        if z is None or z.size != 1:
            return None
        zp = int(z.reshape(()))
        call = lookup(call.args[0]) if isinstance(call.args[0], relax.Var) else call.args[0]
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"):
        return None
    x = call.args[0]
    if str(call.attrs.dtype) != "int32" or str(x.ty.dtype) not in ("int8", "uint8"):
        return None
    return x, zp


def act_matmul_operands(call: relax.Call, lookup) -> tuple[relax.Expr, relax.Expr, int, int] | None:
    """(a, b, za, zb) of an int32 matmul of two centered 8-bit activations with equal leading axes and static
    M, K, N; None for anything else (a constant weight is dot_rewrite's conv path)."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul" and str(call.ty.dtype) == "int32"):
        return None
    found = [_centered(arg, lookup) for arg in call.args]
    if None in found:
        return None
    (a, za), (b, zb) = found
    if const_np(a) is not None or const_np(b) is not None:
        return None
    sa, sb = (getattr(x.ty, "shape", None) for x in (a, b))
    sa, sb = (None if s is None else list(s) for s in (sa, sb))
    if sa is None or sb is None or len(sa) != len(sb) or len(sa) < 3:
        return None
    if not all(isinstance(d, tirx.IntImm) for d in (*sa[-2:], *sb[-2:])) or int(sa[-1]) != int(sb[-2]):
        return None
    if [str(d) for d in sa[:-2]] != [str(d) for d in sb[:-2]]:  # the same leading axes (no broadcast)
        return None
    return a, b, za, zb


def act_matmul_te(a: te.Tensor, b: te.Tensor, za: int, zb: int, kernel: DotKernel) -> te.Tensor:
    """sum_c (a[..., i, c] - za) * (b[..., c, j] - zb) as int32, on `kernel`'s instruction (module
    docstring). The row sums of a' come out of the dot itself, from a column of ones in b's last padded
    column, and the column sums of b' from a row of ones in a's last padded row."""
    *lead, m, k = a.shape
    n = int(b.shape[-1])
    m, k = int(m), int(k)
    lanes, kk = kernel.lanes, kernel.k
    sa, sb = byte_shift(str(a.dtype), kernel.act_dtype), byte_shift(str(b.dtype), kernel.w_dtype)
    za2, zb2 = za + sa, zb + sb
    oc = act_tile(n + 1, kernel)
    mp = -(-(m + 1) // ACT_ROWS) * ACT_ROWS  # a row of ones (zeros where za' = 0) at mp - 1
    kp = -(-k // kk) * kk
    np_ = -(-(n + 1) // (lanes * oc)) * lanes * oc  # a column of ones (zeros where zb' = 0) at np_ - 1

    def shifted(v: tirx.PrimExpr, s: int, dtype: str) -> tirx.PrimExpr:
        return (v.astype("int16") + tirx.const(s, "int16")).astype(dtype) if s else v.astype(dtype)

    def a_value(*i):
        row, c = i[-2], i[-1]
        v = shifted(a[(*i[:-2], tirx.min(row, m - 1), tirx.min(c, k - 1))], sa, kernel.act_dtype)
        one, zero = tirx.const(int(za2 != 0), kernel.act_dtype), tirx.const(0, kernel.act_dtype)
        return tirx.if_then_else(c < k, tirx.if_then_else(row < m, v, tirx.if_then_else(row == mp - 1, one, zero)),
                                 zero)

    def b_value(*i):
        col, c = i[-4] * lanes + i[-2], i[-3] * kk + i[-1]
        v = shifted(b[(*i[:-4], tirx.min(c, k - 1), tirx.min(col, n - 1))], sb, kernel.w_dtype)
        one, zero = tirx.const(int(zb2 != 0), kernel.w_dtype), tirx.const(0, kernel.w_dtype)
        return tirx.if_then_else(c < k, tirx.if_then_else(col < n, v, tirx.if_then_else(col == np_ - 1, one, zero)),
                                 zero)

    a_in = te.compute((*lead, mp, kp), a_value, name="plateau_act_input")
    b_pk = te.compute((*lead, np_ // lanes, kp // kk, lanes, kk), b_value, name="plateau_act_weight")
    rc = te.reduce_axis((0, kp), "rc")
    dot = te.compute(
        (*lead, mp, np_),
        lambda *i: te.sum(a_in[(*i[:-2], i[-2], rc)].astype("int32")
                          * b_pk[(*i[:-2], i[-1] // lanes, rc // kk, i[-1] % lanes, rc % kk)].astype("int32"),
                          axis=rc),
        name=ACT_DOT_BLOCK)

    def out(*i):  # the centered product: sum a'b' - zb' sum a' - za' sum b' + K za' zb'
        # both sums are always read: the epilogue then spans the dot's padded rows and columns, so the dot
        # computed at its loop has whole tiles (no predicate inside the instruction). A sum that is not
        # needed (zero point 0) is a row / column of zeros, read with factor 1: a factor 0 would be folded
        # away with the read.
        rows, cols = dot[(*i[:-1], np_ - 1)], dot[(*i[:-2], mp - 1, i[-1])]
        v = dot[i] - rows * tirx.const(zb2 or 1, "int32") - cols * tirx.const(za2 or 1, "int32")
        return v + tirx.const(k * za2 * zb2, "int32")

    return te.compute((*lead, m, n), out, name="plateau_act_out")


def schedule_act_dot(sch: Schedule, kernel: DotKernel) -> bool:
    """Per (batch, head), in parallel: pack the right operand and shift the left one (with their column and
    row of ones), then register tiles of ACT_ROWS rows x oc*L columns reduced with the instruction, then the
    epilogue (zero-point corrections, requantize) over the head's outputs, vectorized. False, changing
    nothing, where the function is not one act_matmul_te kernel."""
    if not has_root(sch):
        return False
    root = sch.get_sblock("root")
    names = {sch.get(b).name_hint: b for b in sch.get_child_blocks(root)}
    if ACT_DOT_BLOCK not in names:
        return False
    keep = {n for n in names if n.startswith(("plateau_act_input", "plateau_act_weight", ACT_DOT_BLOCK))}
    inline_spatial(sch, skip=keep)
    blocks = sch.get_child_blocks(root)
    outs = [b for b in blocks if not sch.get_consumers(b)]
    if len(outs) != 1:
        return False
    out = outs[0]
    dot = sch.get_sblock(ACT_DOT_BLOCK)
    n_lead = len(sch.get_loops(dot)) - 3
    out_name = sch.get(out).name_hint
    out_loops = sch.get_loops(out)
    if n_lead < 1 or len(out_loops) != n_lead + 2:
        return False
    # anchored on the output's (batch, head) loop; the epilogue reads the dot's last padded row and column
    # (the sums), so the dot computed there keeps whole tiles (no predicate inside the instruction)
    head = sch.fuse(*out_loops[:n_lead]) if n_lead > 1 else out_loops[0]
    for name in (ACT_DOT_BLOCK, "plateau_act_weight", "plateau_act_input"):
        sch.compute_at(sch.get_sblock(name), head)
    sch.parallel(head)
    for name in ("plateau_act_input", "plateau_act_weight"):
        blk = sch.get_sblock(name)
        sch.vectorize(sch.get_loops(blk)[-1])
    # the dot block: (rows / ACT_ROWS, cols / tile) x (K / k) x rows x oc x [L x k: the instruction]
    *_, i, j, c = sch.get_loops(dot)
    width = int(sch.get(j).extent)
    oc = act_tile(width, kernel) if width % (act_tile(width, kernel) * kernel.lanes) == 0 else 1
    io, ii = sch.split(i, [None, ACT_ROWS])
    jo, ji = sch.split(j, [None, kernel.lanes * oc])
    jb, jl = sch.split(ji, [None, kernel.lanes])
    co, ci = sch.split(c, [None, kernel.k])
    sch.reorder(io, jo, co, ii, jb, jl, ci)
    init = sch.decompose_reduction(dot, co)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(jl, kernel.intrin)
    sch.unroll(ii)
    sch.unroll(jb)
    inner = sch.get_loops(sch.get_sblock(out_name))[-1]
    if isinstance(sch.get(inner).extent, tirx.IntImm) and int(sch.get(inner).extent) > 1:
        sch.vectorize(inner)
    return True
