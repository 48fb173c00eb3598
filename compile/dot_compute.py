"""TE compute of the CPU integer kernels: the dot-product conv, the matmul on it, the depthwise conv.

The graph is NHWC between convs (ConvertLayout at the graph boundary). One kernel is

    x (NHWC, or NCHW at the graph input)
        --[input stage: pad with the zero point, shift to the kernel's byte type]-->
        --conv_dot(Wp)--> int32

    conv_dot[n, h, w, o] = sum_{kh, kw, c} x[n, h*sh + kh, w*sw + kw, c]
                                           * Wp[o // L, kh, kw, c // K, o % L, c % K]

with the weight packed once, in numpy (`pack_weight`), so that the L output channels x K input channels of one
instruction are contiguous. The input stage takes in the zero-point Pad (and the transposes ConvertLayout
leaves around it) that precede the conv in the graph, so no separate pad kernel runs between two convs.

For smmla the two pixels of one instruction are rows of a 2x8 operand, so they must sit one row stride apart:
the input is re-laid as [n, h, sw, w/sw, c] (a free view at stride 1), where pixels w and w+1 of a stride-sw
conv are neighbours: x[n, h, w*sw + kw, c] = x'[n, h, kw % sw, w + kw // sw, c].

4-bit weights stay two per byte (`pack_halves`) and are unpacked inside the kernel (DOT_WEIGHT). Matmuls with
a constant weight are the same conv over token rows (`matmul_te`); depthwise convs get their own compute on
the same input stage (`dw_te`). The blocks are named (DOT_BLOCK, ...): the schedule finds them after FuseTIR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from plateau.quant import pack_int4

__all__ = ["DOT_BLOCK", "DOT_INPUT", "DOT_WEIGHT", "DW_BLOCK", "ConvInput", "pack_weight", "pack_halves",
           "conv_te", "fused_conv_te", "matmul_te", "dw_te",
           "MATMUL_ROWS", "token_rows"]

DOT_BLOCK = "plateau_dot_conv"  # the conv block's name; FuseTIR keeps it, the scheduler finds it by it
DOT_INPUT = "plateau_dot_input"  # the conv's input stage (pad, shift, re-layout), scheduled per output row
DOT_WEIGHT = "plateau_dot_weight"  # 4-bit weights unpacked from two per byte, once per call before the rows
DW_BLOCK = "plateau_dw_conv"  # the depthwise conv's block (no dot product: one tap per channel and pixel)


@dataclass(frozen=True)
class ConvInput:
    """How the conv reads its integer input: layout of the source tensor, spatial pads (top, bottom, left,
    right) filled with `value` (the zero point), input channels padded to `channels` (they meet zero weights),
    `shift` added to reach the kernel's byte type `dtype`, and for smmla the pixel-pair stride `pairs` (0:
    none)."""

    layout: str = "NHWC"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    value: int = 0
    channels: int = 0
    shift: int = 0
    dtype: str = "uint8"
    pairs: int = 0


def pack_weight(w_ohwi: np.ndarray, lanes: int, k: int = 4, groups: int = 1) -> tuple[np.ndarray, int]:
    """OHWI int8 -> [O/L, KH, KW, Ck/K, L, K] with input channels zero-padded to Ck (a multiple of K); with
    `groups` > 1, [O/L, KH, KW, Ck/K, G, L, K/G] (the kernel's operand is G registers of L x K/G bytes)."""
    o, kh, kw, c = w_ohwi.shape
    ck = -(-c // k) * k
    w = np.zeros((o, kh, kw, ck), np.int8)
    w[..., :c] = w_ohwi
    if groups > 1:
        blocks = w.reshape(o // lanes, lanes, kh, kw, ck // k, groups, k // groups)
        return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 5, 1, 6)), ck
    blocks = w.reshape(o // lanes, lanes, kh, kw, ck // k, k)
    return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 1, 5)), ck


def pack_halves(wp: np.ndarray) -> np.ndarray:
    """The packed weight [..., L, K] (values in -8..7) as 4-bit values two per byte, in groups of the L*K
    bytes one instruction reads: byte j of a group holds value j in its low nibble and value j + L*K/2 in its
    high one, so the unpack is two vector operations with one shift each (_weight_te). The nibbles are
    plateau.quant's (pack_int4, low nibble first) after interleaving each group's two halves."""
    g = wp.shape[-1] * wp.shape[-2]
    halves = wp.reshape(-1, 2, g // 2)
    return pack_int4(np.stack([halves[:, 0], halves[:, 1]], axis=-1))


def _input_te(src: te.Tensor, how: ConvInput) -> te.Tensor:
    """The conv's input stage: NHWC (or [n, h, sw, w/sw, c] for smmla pairs), padded, shifted, in
    how.dtype."""
    if how.layout == "NCHW":
        n, c, h, w = src.shape
        load = lambda b, y, x, ch: src[b, ch, y, x]  # noqa: E731
    else:
        n, h, w, c = src.shape
        load = lambda b, y, x, ch: src[b, y, x, ch]  # noqa: E731
    t, bottom, left, right = how.pads
    hp, wp = h + t + bottom, w + left + right

    def value(b, y, x, ch):
        inside = [y >= t, y < h + t, x >= left, x < w + left] if any(how.pads) else []
        if int(c) != how.channels:
            inside.append(ch < c)
        v = load(b, y - t, x - left, ch)
        if inside:
            v = tvm.tirx.if_then_else(tvm.tirx.all(*inside), v, tvm.tirx.const(how.value, src.dtype))
        if how.shift:  # exact in int16
            v = (v.astype("int16") + tvm.tirx.const(how.shift, "int16"))
        return v.astype(how.dtype)

    if how.pairs:
        s = how.pairs
        return te.compute((n, hp, s, wp // s, how.channels),
                          lambda b, y, r, q, ch: value(b, y, q * s + r, ch), name=DOT_INPUT)
    return te.compute((n, hp, wp, how.channels), value, name=DOT_INPUT)


def _weight_te(packed: te.Tensor, shape: tuple[int, ...], dtype: str = "int8") -> te.Tensor:
    """The packed weight [O/L, KH, KW, Ck/K, (G,) L, K] unpacked from pack_halves' bytes, sign-extended by
    (v ^ 8) - 8, as the kernel's weight type."""
    half = shape[-1] * shape[-2] // 2

    def value(*idx):
        group = idx[0]
        for i, d in zip(idx[1:-2], shape[1:-2], strict=True):
            group = group * d + i
        lane = idx[-2] * shape[-1] + idx[-1]
        byte = packed[group * half + lane % half]
        nibble = tvm.tirx.if_then_else(lane < half, byte & tvm.tirx.const(0xF, "uint8"),
                                       byte >> tvm.tirx.const(4, "uint8"))
        return ((nibble.astype("int8") ^ tvm.tirx.const(8, "int8")) - tvm.tirx.const(8, "int8")).astype(dtype)

    return te.compute(shape, value, name=DOT_WEIGHT)


def fused_conv_te(src: te.Tensor, wp: te.Tensor, sh: int, sw: int, how: ConvInput,
                  int4_shape: tuple[int, ...] | None = None, w_dtype: str = "int8") -> te.Tensor:
    """The whole kernel: input stage, then the dot conv (pairs layout for smmla); with `int4_shape`, `wp` is
    the packed 4-bit weight, unpacked first (to `w_dtype`)."""
    data = _input_te(src, how)
    if int4_shape is not None:
        wp = _weight_te(wp, int4_shape, w_dtype)
    return (_conv_te_pairs if how.pairs else conv_te)(data, wp, sh, sw)


MATMUL_ROWS = 8  # token rows per register tile of the matmul (the conv's output pixels; dot_schedule), at most
ROW_CHOICES = (8, 7, 6, 5, 4)  # the row counts token_rows picks from


def token_rows(lead: list | tuple) -> int:
    """Token rows per register tile of a matmul whose leading axes are `lead` (a symbolic batch allowed):
    MATMUL_ROWS, unless another of ROW_CHOICES pads the static rows by 5% fewer (the one padding least, the
    larger on a tie; MATMUL_ROWS where only the batch is there). A ViT's 65 tokens take 5: 8 would compute
    72 rows at batch 1, 11% of every Linear's work on padding; dividing the static rows, 5 pads none at any
    batch. Measured on the shared ViT-Tiny W4A8 (AVX2): batch 1 0.88x the 8-row time, batch 64 0.98x; at
    197 tokens (200 rows against 198) 6 rows were no faster than 8 (bench/RESULTS.md)."""
    static = 1
    for d in lead:
        if isinstance(d, (int, tvm.tirx.IntImm)):
            static *= int(d)
    if static == 1:  # rows = the batch alone (a classifier head): nothing static to fit, the widest tile
        return MATMUL_ROWS

    def padded(r: int) -> int:
        return -(-static // r) * r

    best = min(ROW_CHOICES, key=lambda r: (padded(r), -r))
    return MATMUL_ROWS if padded(MATMUL_ROWS) <= 1.05 * padded(best) else best


def matmul_te(src: te.Tensor, wp: te.Tensor, how: ConvInput, int4_shape: tuple[int, ...] | None = None,
              w_dtype: str = "int8", rows: int | None = None) -> te.Tensor:
    """x [..., K] @ W as the dot conv over token rows: the M rows of x (every leading axis flattened) are
    laid out as [ceil(M / rows), 1, rows, K], so `rows` tokens (token_rows by default) are the output pixels
    of one register tile and share each weight load; the rows past M read zeros and their outputs are
    dropped. The output keeps the matmul's shape, so its epilogue fuses as for a conv."""
    lead, k = list(src.shape[:-1]), src.shape[-1]
    rows = rows or token_rows(lead)
    m = 1
    for d in lead:
        m = m * d
    zero = tvm.tirx.const(0, src.dtype)

    def token(i, t, c):
        flat = i * rows + t
        idx = []
        for d in reversed(lead[1:]):
            idx.append(flat % d)
            flat = flat // d
        idx.append(flat)
        return tvm.tirx.if_then_else(i * rows + t < m, src[(*reversed(idx), c)], zero)

    # (m - 1) // rows + 1 tiles, not (m + rows - 1) // rows: the same count, in the form TVM matches against the
    # rows matmul_out reads, (m - 1) // rows at most (the region-cover check of compute_at)
    x4 = te.compute(((m - 1) // rows + 1, 1, rows, k), lambda i, _h, t, c: token(i, t, c), name="matmul_rows")
    conv = fused_conv_te(x4, wp, 1, 1, how, int4_shape, w_dtype)

    def out(*idx):
        *at, n = idx
        flat = at[0]
        for i, d in zip(at[1:], lead[1:], strict=True):
            flat = flat * d + i
        return conv[flat // rows, 0, flat % rows, n]

    return te.compute((*lead, conv.shape[3]), out, name="matmul_out")


def dw_te(src: te.Tensor, w: te.Tensor, sh: int, sw: int, how: ConvInput) -> te.Tensor:
    """Depthwise conv on the same input stage: out[n, y, x, c] = sum_{kh, kw} x[n, y*sh+kh, x*sw+kw, c] *
    w[kh, kw, c], int32 products of the int8 bytes."""
    data = _input_te(src, how)
    n, h, wd, c = data.shape
    kh, kw, _ = w.shape
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, (h - kh) // sh + 1, (wd - kw) // sw + 1, c),
        lambda b, y, x, o: te.sum(data[b, y * sh + rh, x * sw + rw, o].astype("int32")
                                  * w[rh, rw, o].astype("int32"), axis=[rh, rw]),
        name=DW_BLOCK,
    )


def conv_te(data: te.Tensor, wp: te.Tensor, sh: int, sw: int) -> te.Tensor:
    """The dot conv on an NHWC input stage and a packed weight [O/L, KH, KW, Ck/K, L, K] or, grouped,
    [O/L, KH, KW, Ck/K, G, L, K/G] (module docstring, pack_weight)."""
    n, h, w, _ = data.shape
    if len(wp.shape) == 7:
        ocb, kh, kw, cb, groups, lanes, kg = wp.shape
        k = groups * kg

        def weight(o, rh, rw, rc):
            return wp[o // lanes, rh, rw, rc // k, rc % k // kg, o % lanes, rc % kg]
    else:
        ocb, kh, kw, cb, lanes, k = wp.shape

        def weight(o, rh, rw, rc):
            return wp[o // lanes, rh, rw, rc // k, o % lanes, rc % k]
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cb * k), "rc")
    return te.compute(
        (n, oh, ow, ocb * lanes),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + rh, x * sw + rw, rc].astype("int32") * weight(o, rh, rw, rc).astype("int32"),
            axis=[rh, rw, rc],
        ),
        name=DOT_BLOCK,
    )


def _conv_te_pairs(data: te.Tensor, wp: te.Tensor, sh: int, sw: int) -> te.Tensor:
    """The smmla conv on the input re-laid as [n, h, sw, w/sw, c] (see the module docstring)."""
    n, h, s, wq, _ = data.shape
    ocb, kh, kw, cb, lanes, k = wp.shape
    oh, ow = (h - kh) // sh + 1, (wq * s - kw) // sw + 1
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cb * k), "rc")
    return te.compute(
        (n, oh, ow, ocb * lanes),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + rh, rw % sw, x + rw // sw, rc].astype("int32")
            * wp[o // lanes, rh, rw, rc // k, o % lanes, rc % k].astype("int32"),
            axis=[rh, rw, rc],
        ),
        name=DOT_BLOCK,
    )
