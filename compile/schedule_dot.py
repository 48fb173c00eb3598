"""Dot-product integer conv2d kernels: packed weights, a tensor intrinsic per CPU and their TIR schedule.

Instructions of one family, "P pixels x L output channels, each += K activation bytes . K weight bytes":

    x86 AVX-512 VNNI  vpdpbusd  P = 1, L = 16, K = 4, u8 x s8   (DotKernel VNNI)
                      (256-bit) P = 1, L = 8,  K = 4, u8 x s8   (VNNI8: convs with 8k, not 16k, output channels)
    x86 AVX2          vpmaddwd  P = 1, L = 8,  K = 2, s16 x s16 (DotKernel AVX2: int16 activations and weights)
    aarch64 dotprod   sdot      P = 1, L = 4,  K = 4, s8 x s8   (DotKernel SDOT)
    aarch64 i8mm      smmla     P = 2, L = 2,  K = 8, s8 x s8   (DotKernel SMMLA: a 2x8 by 8x2 matrix product)

The graph is NHWC between convs (ConvertLayout at the graph boundary). Each integer conv2d whose input channels
pad to a multiple of 4 and whose output channels are a multiple of L becomes one kernel

    x (NHWC, or NCHW at the graph input) --[input stage: pad with the zero point, shift to the kernel's byte type]-->
        --conv_dot(Wp)--> int32 --(- shift * sum W)--> epilogue

The input stage absorbs the zero-point Pad (and the transposes ConvertLayout leaves around it) that precede the
conv in the graph, so no separate pad kernel runs between two convs; the schedule computes it per band of output
rows, for the input rows the band reads (a few KB, hot in cache).

The same kernel serves 4-bit weights (re-packed two per byte in its order, unpacked inside it: DOT_WEIGHT) and
matmuls with a constant weight (x [N, T, K] as an N x T x 1 image and a 1x1 kernel: _matmul_te). Depthwise convs
get their own kernel on the same input stage (_dw_te, schedule_dw_conv): no dot product there, one tap per channel.

    conv_dot[n, h, w, o] = sum_{kh, kw, c} x[n, h*sh + kh, w*sw + kw, c] * Wp[o // L, kh, kw, c // K, o % L, c % K]

For smmla the two pixels of one instruction are rows of a 2x8 operand, so they must sit one row stride apart: the
input is re-laid as [n, h, sw, w/sw, c] (a free view at stride 1), where pixels w and w+1 of a stride-sw conv are
neighbours: x[n, h, w*sw + kw, c] = x'[n, h, kw % sw, w + kw // sw, c].

`vpdpbusd` multiplies unsigned by signed bytes, so int8 activations are shifted by +128; `sdot` is signed, so uint8
activations are shifted by -128; AVX2's input stage widens both to int16 (no shift). AVX2 has `vpmaddubsw` for
u8 x s8, but it sums pairs into saturating int16 (255 * -128 * 2 overflows), so it is not used. The shift is exact: the shift times the weight sum is subtracted again, a
per-channel constant. The weights are repacked once, in numpy, so that the L output channels x 4 input channels of one
instruction are contiguous bytes. The schedule keeps an (ow_block x L*oc_block) int32 tile in registers, reduces over
(kh, kw, c/4) with one instruction per (pixel, L channels, 4 inputs), runs the fused epilogue (bias, requantize,
clip, cast) on the tile, and parallelizes (n, bands of oh).

LLVM 22 changed the VNNI intrinsic to take byte vectors (<64 x i8>); TVM's own VNNI intrinsic passes int32 vectors
and fails to compile, so this file registers its own (and the sdot one beside it, for symmetry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from ._common import const_np
from .pack_int4 import unpacked_value

log = logging.getLogger(__name__)

__all__ = ["DotKernel", "VNNI", "VNNI8", "SDOT", "AVX2", "has_avx2", "kernel_of", "DOT_BLOCK", "DOT_INPUT", "DOT_WEIGHT", "DW_BLOCK", "ConvInput", "ConvTile", "dot_kernel", "rewrite_convs_dot",
           "schedule_dot_conv", "schedule_dw_conv", "has_vnni", "has_sdot", "default_tile", "conv_extents"]

VNNI_INTRIN = "plateau_vnni_16x4_u8s8s32"
VNNI8_INTRIN = "plateau_vnni_8x4_u8s8s32"
SDOT_INTRIN = "plateau_sdot_4x4_s8s8s32"
SMMLA_INTRIN = "plateau_smmla_2x2x8_s8s8s32"
AVX2_INTRIN = "plateau_avx2_8x2_s16s16s32"
DOT_BLOCK = "plateau_dot_conv"  # the conv block's name; FuseTIR keeps it, the scheduler finds it by it
DOT_INPUT = "plateau_dot_input"  # the conv's input stage (pad, shift, re-layout), scheduled per output row
DOT_WEIGHT = "plateau_dot_weight"  # 4-bit weights unpacked from two per byte, once per call before the rows
DW_BLOCK = "plateau_dw_conv"  # the depthwise conv's block (no dot product: one tap per channel and pixel)
DW_LANES = 16  # channels per depthwise tile: int32 vectors of 16 (one zmm; four NEON registers)


@dataclass(frozen=True)
class DotKernel:
    """One instruction: `pixels` x `lanes` int32 outputs, each += `k` activation bytes . `k` weight bytes."""

    name: str
    intrin: str
    lanes: int
    act_dtype: str  # the activation byte type the instruction takes ("uint8" or "int8")
    registers: int  # accumulators a register tile may hold
    pixels: int = 1
    k: int = 4
    w_dtype: str = "int8"  # the weight type the instruction takes


VNNI = DotKernel("vnni", VNNI_INTRIN, 16, "uint8", 28)
VNNI8 = DotKernel("vnniy", VNNI8_INTRIN, 8, "uint8", 28)  # 256-bit vpdpbusd: convs with 8k, not 16k, channels
SDOT = DotKernel("sdot", SDOT_INTRIN, 4, "int8", 24)
SMMLA = DotKernel("smmla", SMMLA_INTRIN, 2, "int8", 24, pixels=2, k=8)
# AVX2 without VNNI: vpmaddwd, int16 x int16 pairs summed into int32 (exact; vpmaddubsw's int16 sums saturate).
# The input stage widens the activations to int16 (int8 and uint8 alike, no shift); weights are stored as int16.
AVX2 = DotKernel("avx2", AVX2_INTRIN, 8, "int16", 12, k=2, w_dtype="int16")

# CPUs LLVM knows with AVX-512 VNNI (mcpu names); "+avx512vnni" in mattr also counts.
_VNNI_CPUS = {"znver4", "znver5", "cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
              "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "rocketlake", "alderlake-avx512"}


def _dot_desc(lanes: int, k: int, act: str, weight: str) -> tirx.PrimFunc:
    """The description every one-pixel dot instruction matches: `lanes` int32 lanes, each += `k` `act` values .
    `k` `weight` values; lane i of B holds output channel i's k weights."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (k,), act, offset_factor=1)
        B = T.match_buffer(b, (lanes, k), weight, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:k], B[0:lanes, 0:k])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for r in T.serial(0, k):
                    with T.sblock("update"):
                        vi, vr = T.axis.remap("SR", [i, r])
                        C[vi] = C[vi] + T.cast(A[vr], "int32") * T.cast(B[vi, vr], "int32")

    return desc


def _dot_pair(lanes: int, act: str, llvm_intrinsic: str) -> tuple:
    """(description, implementation) of `lanes` int32 lanes, each += 4 `act` bytes . 4 int8 weight bytes: the 4
    activation bytes are broadcast to every lane, lane i of B holds output channel i's 4 weights."""
    a_bytes, b_bytes, acc = f"{act}x{4 * lanes}", f"int8x{4 * lanes}", f"int32x{lanes}"
    desc = _dot_desc(lanes, 4, act, "int8")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), act, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_vec = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{act}x4"), dtype="int32"), lanes),
                                  dtype=a_bytes)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic), C.vload([0], dtype=acc), a_vec,
                B.vload([0, 0], dtype=b_bytes), dtype=acc,
            )

    return desc, impl


@T.prim_func(s_tir=True)
def _smmla_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    sa = T.int32()
    sc = T.int32()
    A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[sa, 1])  # 2 pixels x 8 input channels
    B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)  # 2 output channels x 8 input channels
    C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, strides=[sc, 1])  # 2 pixels x 2 output channels
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        for i, j, k in T.grid(2, 2, 8):
            with T.sblock("update"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk], "int32")


@T.prim_func(s_tir=True)
def _smmla_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    sa = T.int32()
    sc = T.int32()
    A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[sa, 1])
    B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
    C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, strides=[sc, 1])
    with T.sblock("root"):
        T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
        T.writes(C[0:2, 0:2])
        # smmla: C (2x2, row-major in one register) += A (2x8) . B^T (B: 2x8)
        a16 = T.vectorcombine("int8x16", A.vload([0, 0], "int8x8"), A.vload([1, 0], "int8x8"))
        c4 = T.vectorcombine("int32x4", C.vload([0, 0], "int32x2"), C.vload([1, 0], "int32x2"))
        r = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                                    c4, a16, B.vload([0, 0], "int8x16"), dtype="int32x4")
        C[0, T.ramp(T.int32(0), 1, 2)] = T.vectorlow("int32x2", r)
        C[1, T.ramp(T.int32(0), 1, 2)] = T.vectorhigh("int32x2", r)


@T.prim_func(s_tir=True)
def _pmaddwd_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (2,), "int16", offset_factor=1)
    B = T.match_buffer(b, (8, 2), "int16", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        # the activation pair broadcast to every lane; vpmaddwd: lane i = a0 * b[i, 0] + a1 * b[i, 1]
        a_vec = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8),
                              dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a_vec, B.vload([0, 0], dtype="int16x16"),
            dtype="int32x8")


def _register() -> None:
    # LLVM 22's vpdpbusd takes (<16 x i32>, <64 x i8>, <64 x i8>); sdot (<4 x i32>, <16 x i8>, <16 x i8>)
    vnni = _dot_pair(16, "uint8", "llvm.x86.avx512.vpdpbusd.512")
    vnni8 = _dot_pair(8, "uint8", "llvm.x86.avx512.vpdpbusd.256")
    sdot = _dot_pair(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")
    for name, (desc, impl) in ((VNNI_INTRIN, vnni), (VNNI8_INTRIN, vnni8), (SDOT_INTRIN, sdot),
                               (SMMLA_INTRIN, (_smmla_desc, _smmla_impl)), (AVX2_INTRIN, (_dot_desc(8, 2, "int16", "int16"), _pmaddwd_impl))):
        try:
            TensorIntrin.get(name)
        except Exception:  # not registered yet (get raises a TVMError for unknown names)
            TensorIntrin.register(name, desc, impl)


_register()


def _x86_has(target: tvm.target.Target, cpus: set[str], feature: str) -> bool:
    """Whether `target` is x86 LLVM with `feature`: its mcpu among `cpus`, or `feature` in its mattr."""
    if target.kind.name != "llvm":
        return False
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686")):
        return False
    mattr = [str(a) for a in (attrs.get("mattr") or [])]
    return str(attrs.get("mcpu", "") or "") in cpus or feature in mattr


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether `target` is x86-64 with AVX-512 VNNI (by mcpu name or +avx512vnni in mattr)."""
    return _x86_has(target, _VNNI_CPUS, "+avx512vnni")


# x86-64 CPUs LLVM knows with AVX2 (those with AVX-512 VNNI take VNNI first); "+avx2" in mattr also counts.
_AVX2_CPUS = {"haswell", "broadwell", "skylake", "skylake-avx512", "cannonlake", "kabylake", "coffeelake",
              "cometlake", "alderlake", "raptorlake", "meteorlake", "arrowlake", "arrowlake-s", "lunarlake",
              "gracemont", "sierraforest", "grandridge", "clearwaterforest", "znver1", "znver2", "znver3",
              "x86-64-v3", "x86-64-v4", *_VNNI_CPUS}


def has_avx2(target: tvm.target.Target) -> bool:
    """Whether `target` is x86-64 with AVX2 (by mcpu name or +avx2 in mattr)."""
    return _x86_has(target, _AVX2_CPUS, "+avx2")


# aarch64 CPUs LLVM knows with the dot-product extension; "+dotprod" (or "+i8mm", ARMv8.6) in mattr also counts.
_SDOT_CPUS = {"cortex-a55", "cortex-a65", "cortex-a75", "cortex-a76", "cortex-a77", "cortex-a78", "cortex-a710",
              "cortex-a715", "cortex-x1", "cortex-x2", "neoverse-n1", "neoverse-n2", "neoverse-v1", "apple-m1"}


def has_sdot(target: tvm.target.Target) -> bool:
    """Whether `target` is aarch64 with the dot-product extension (sdot)."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "") or "").startswith("aarch64"):
        return False
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    return str(target.attrs.get("mcpu", "") or "") in _SDOT_CPUS or "+dotprod" in mattr or "+i8mm" in mattr


_I8MM_CPUS = {"cortex-a710", "cortex-a715", "cortex-x2", "cortex-x3", "neoverse-n2", "neoverse-v1", "neoverse-v2"}


def has_i8mm(target: tvm.target.Target) -> bool:
    """Whether `target` is aarch64 with the int8 matrix-multiply extension (smmla)."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "") or "").startswith("aarch64"):
        return False
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    return str(target.attrs.get("mcpu", "") or "") in _I8MM_CPUS or "+i8mm" in mattr


def dot_kernel(target: tvm.target.Target) -> DotKernel | None:
    """The dot-product conv kernel for `target`: VNNI on x86 with AVX-512 VNNI, else vpmaddwd with AVX2; smmla on
    aarch64 with i8mm, sdot on aarch64 with dotprod."""
    if has_vnni(target):
        return VNNI
    if has_avx2(target):
        return AVX2
    if has_i8mm(target):
        return SMMLA
    if has_sdot(target):
        return SDOT
    return None


# ---------------------------------------------------------------------------------------------- graph rewrite


def _pack_weight(w_ohwi: np.ndarray, lanes: int, k: int = 4) -> tuple[np.ndarray, int]:
    """OHWI int8 -> [O/L, KH, KW, Ck/K, L, K] with input channels zero-padded to Ck (a multiple of K)."""
    o, kh, kw, c = w_ohwi.shape
    ck = -(-c // k) * k
    w = np.zeros((o, kh, kw, ck), np.int8)
    w[..., :c] = w_ohwi
    return np.ascontiguousarray(w.reshape(o // lanes, lanes, kh, kw, ck // k, k).transpose(0, 2, 3, 4, 1, 5)), ck


@dataclass(frozen=True)
class ConvInput:
    """How the conv reads its integer input: layout of the source tensor, spatial pads (top, bottom, left, right)
    filled with `value` (the zero point), input channels padded to `channels` (they meet zero weights), `shift`
    added to reach the kernel's byte type `dtype`, and for smmla the pixel-pair stride `pairs` (0: none)."""

    layout: str = "NHWC"
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    value: int = 0
    channels: int = 0
    shift: int = 0
    dtype: str = "uint8"
    pairs: int = 0


def _input_te(src: te.Tensor, how: ConvInput) -> te.Tensor:
    """The conv's input stage: NHWC (or [n, h, sw, w/sw, c] for smmla pairs), padded, shifted, in how.dtype."""
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
        return te.compute((n, hp, s, wp // s, how.channels), lambda b, y, r, q, ch: value(b, y, q * s + r, ch),
                          name=DOT_INPUT)
    return te.compute((n, hp, wp, how.channels), value, name=DOT_INPUT)


def _pack_halves(wp: np.ndarray) -> np.ndarray:
    """The packed weight [..., L, K] as 4-bit values two per byte, in groups of the L*K bytes one instruction
    reads: byte j of a group holds value j in its low nibble and value j + L*K/2 in its high one, so the
    unpack is two vector operations with one shift each (_weight_te)."""
    g = wp.shape[-1] * wp.shape[-2]
    v = wp.reshape(-1, 2, g // 2).astype(np.uint8) & 0xF
    return np.ascontiguousarray(v[:, 0] | (v[:, 1] << 4)).reshape(-1)


def _weight_te(packed: te.Tensor, shape: tuple[int, ...], dtype: str = "int8") -> te.Tensor:
    """The packed weight [O/L, KH, KW, Ck/K, L, K] unpacked from _pack_halves' bytes, sign-extended by
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


def _fused_conv_te(src: te.Tensor, wp: te.Tensor, sh: int, sw: int, how: ConvInput,
                   int4_shape: tuple[int, ...] | None = None, w_dtype: str = "int8") -> te.Tensor:
    """The whole kernel: input stage, then the dot conv (pairs layout for smmla); with `int4_shape`, `wp` is the
    packed 4-bit weight, unpacked first (to `w_dtype`)."""
    data = _input_te(src, how)
    if int4_shape is not None:
        wp = _weight_te(wp, int4_shape, w_dtype)
    return (_conv_te_pairs if how.pairs else _conv_te)(data, wp, sh, sw)


def _matmul_te(src: te.Tensor, wp: te.Tensor, how: ConvInput, int4_shape: tuple[int, ...] | None = None,
               w_dtype: str = "int8") -> te.Tensor:
    """x [B, T, K] (or [B, K]) @ W as the dot conv: rows are tokens (H = T, W = 1, a 1x1 kernel), so the rows run
    in parallel; the output keeps the matmul's shape, so its epilogue fuses as for a conv."""
    rows = src.shape[1] if len(src.shape) == 3 else 1
    k = src.shape[-1]
    x4 = te.compute((src.shape[0], rows, 1, k),
                    lambda b, t, _w, c: src[b, t, c] if len(src.shape) == 3 else src[b, c], name="matmul_rows")
    conv = _fused_conv_te(x4, wp, 1, 1, how, int4_shape, w_dtype)
    if len(src.shape) == 3:
        return te.compute((src.shape[0], rows, conv.shape[3]), lambda b, t, n: conv[b, t, 0, n], name="matmul_out")
    return te.compute((src.shape[0], conv.shape[3]), lambda b, n: conv[b, 0, 0, n], name="matmul_out")


def _dw_te(src: te.Tensor, w: te.Tensor, sh: int, sw: int, how: ConvInput) -> te.Tensor:
    """Depthwise conv on the same input stage: out[n, y, x, c] = sum_{kh, kw} x[n, y*sh+kh, x*sw+kw, c] *
    w[kh, kw, c], int32 products of the int8 bytes."""
    data = _input_te(src, how)
    n, h, wd, c = data.shape
    kh, kw, _ = w.shape
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, (h - kh) // sh + 1, (wd - kw) // sw + 1, c),
        lambda b, y, x, o: te.sum(data[b, y * sh + rh, x * sw + rw, o].astype("int32") * w[rh, rw, o].astype("int32"),
                                  axis=[rh, rw]),
        name=DW_BLOCK,
    )


def _conv_te(data: te.Tensor, wp: te.Tensor, sh: int, sw: int) -> te.Tensor:
    n, h, w, _ = data.shape
    ocb, kh, kw, cb, lanes, k = wp.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cb * k), "rc")
    return te.compute(
        (n, oh, ow, ocb * lanes),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + rh, x * sw + rw, rc].astype("int32")
            * wp[o // lanes, rh, rw, rc // k, o % lanes, rc % k].astype("int32"),
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


def _matmul(call: relax.Call, kernel: DotKernel, lookup=None) -> tuple[np.ndarray, bool] | None:
    """(the weight as OHWI [N, 1, 1, K], whether it is packed int4) of an integer matmul x [B, (T,) K] @ W [K, N]
    with a constant W the dot kernel takes (N a multiple of L; T and K static), else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul" or str(call.ty.dtype) != "int32":
        return None
    x = call.args[0]
    shape = getattr(x.ty, "shape", None)
    shape = None if shape is None else list(shape)
    if str(x.ty.dtype) not in ("int8", "uint8") or shape is None or len(shape) not in (2, 3):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in shape[1:]) or kernel.pixels > 1:
        return None
    w, int4 = const_np(call.args[1]), False
    if w is None and lookup is not None:
        w, int4 = unpacked_value(call.args[1], lookup), True
    if w is None or w.dtype != np.int8 or w.ndim != 2 or w.shape[0] != int(shape[-1]) or w.shape[1] % kernel.lanes:
        return None
    return np.ascontiguousarray(w.T).reshape(w.shape[1], 1, 1, w.shape[0]), int4


def _depthwise(call: relax.Call, lookup=None) -> np.ndarray | None:
    """The [C, KH, KW, 1] int8 weight of an integer NHWC depthwise conv2d (groups = channels, C a multiple of
    8), else None. 4-bit weights are read back from pack_int4's constant (a few KB: kept as int8)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "OHWI", "NHWC") or str(a.out_dtype) != "int32":
        return None
    c = call.args[0].ty.shape[3]
    w = const_np(call.args[1])
    if w is None and lookup is not None:
        w = unpacked_value(call.args[1], lookup)
    if not isinstance(c, tvm.tirx.IntImm) or int(a.groups) != int(c) or int(c) % 8 or w is None:
        return None
    if str(call.args[0].ty.dtype) not in ("int8", "uint8") or any(int(d) != 1 for d in a.dilation):
        return None
    return w if w.dtype == np.int8 and w.ndim == 4 and w.shape[0] == int(c) and w.shape[3] == 1 else None


def _eligible(call: relax.Call, kernel: DotKernel, lookup=None) -> tuple[np.ndarray, bool] | None:
    """(the OHWI int8 weight, whether it is stored as packed int4) of an integer NHWC conv2d the dot kernel
    handles, else None. A 4-bit weight of pack_int4 is read back from its packed constant (`lookup`: the
    mutator's lookup_binding)."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "OHWI", "NHWC") or int(a.groups) != 1:
        return None
    if str(a.out_dtype) != "int32" or any(int(d) != 1 for d in a.dilation):
        return None
    w, int4 = const_np(call.args[1]), False
    if w is None and lookup is not None:
        w, int4 = unpacked_value(call.args[1], lookup), True
    if str(call.args[0].ty.dtype) not in ("int8", "uint8") or w is None:
        return None
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[0] % kernel.lanes:
        return None
    if kernel.pixels > 1:  # pixel pairs: a static output width, a multiple of the pixels
        ow = call.ty.shape[2] if getattr(call.ty, "shape", None) is not None else None
        if not isinstance(ow, tvm.tirx.IntImm) or int(ow) % kernel.pixels:
            return None
    return w, int4


@relax.expr_functor.mutator
class _DotConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, kernel: DotKernel) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.kernel = kernel
        self.count = 0

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def _binding(self, expr: relax.Expr, op: str) -> relax.Call | None:
        """The call of `op` bound to the var `expr`, if it is one."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        ok = isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op) and bound.op.name == op
        return bound if ok else None

    def _zero_point_pad(self, data: relax.Expr) -> tuple[relax.Expr, str, tuple[int, ...], int] | None:
        """(source, its layout, (top, bottom, left, right), value) when the conv's NHWC input is a constant pad of
        H and W only: pad(x) in NHWC, or permute(pad(y), NCHW->NHWC), the form ConvertLayout leaves, with y an
        NCHW tensor or permute(x, NHWC->NCHW). None otherwise."""
        layout = "NHWC"
        outer = self._binding(data, "relax.permute_dims")
        if outer is not None:
            if [int(a) for a in outer.attrs.axes] != [0, 2, 3, 1]:
                return None
            layout, data = "NCHW", outer.args[0]
        pad = self._binding(data, "relax.nn.pad")
        if pad is None or str(pad.attrs.pad_mode) != "constant":
            return None
        pw = [int(p) for p in pad.attrs.pad_width]
        hw = (2, 3) if layout == "NCHW" else (1, 2)
        if len(pw) != 8 or any(pw[2 * a] or pw[2 * a + 1] for a in range(4) if a not in hw):
            return None
        src = pad.args[0]
        value = float(pad.attrs.pad_value)
        dtype = str(src.ty.dtype)
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        if value != int(value) or not lo <= value <= hi:
            return None
        inner = self._binding(src, "relax.permute_dims") if layout == "NCHW" else None
        if inner is not None and [int(a) for a in inner.attrs.axes] == [0, 3, 1, 2]:
            layout, src = "NHWC", inner.args[0]
        (ht, hb), (wl, wr) = (pw[2 * hw[0]], pw[2 * hw[0] + 1]), (pw[2 * hw[1]], pw[2 * hw[1] + 1])
        return src, layout, (ht, hb, wl, wr), int(value)

    def _conv_source(self, call: relax.Call) -> tuple[relax.Expr, str, tuple[int, ...], int]:
        """(source, its layout, (top, bottom, left, right) pads, pad value) the conv's input stage reads: the
        conv's own zero padding, or, when it has none, the zero-point Pad before it (_zero_point_pad)."""
        t, left, b, r = (int(p) for p in call.attrs.padding)  # relax conv2d padding is (top, left, bottom, right)
        pads = (t, b, left, r)
        peeled = None if any(pads) else self._zero_point_pad(call.args[0])
        return peeled if peeled is not None else (call.args[0], "NHWC", pads, 0)

    def _depthwise_call(self, call: relax.Call, w: np.ndarray) -> relax.Expr:
        """The depthwise kernel: its input stage takes in the zero-point pad like the dot kernel's (no shift: the
        bytes are multiplied as they are, widened to int32)."""
        sh, sw = (int(s) for s in call.attrs.strides)
        src, layout, pads, value = self._conv_source(call)
        how = ConvInput(layout, pads, value, int(w.shape[0]), 0, str(src.ty.dtype), 0)
        w_hwc = np.ascontiguousarray(w[..., 0].transpose(1, 2, 0))
        self.count += 1
        return self.builder_.call_te(partial(_dw_te, sh=sh, sw=sw, how=how), src, relax.const(w_hwc),
                                     primfunc_name_hint="plateau_dwconv2d")

    def _dot_call(self, te_fn, src: relax.Expr, act_dtype: str, w: np.ndarray, int4: bool, k: DotKernel,
                  name: str, **how: object) -> relax.Expr:
        """Emit the dot kernel `te_fn(src, packed weight, how=ConvInput, int4_shape=...)` for the OHWI int8 weight
        `w`, and the per-channel constant that undoes the activation shift (a conv and a matmul alike)."""
        # +128 takes int8 to uint8 (VNNI), -128 takes uint8 to int8 (sdot); 0 when the types already agree or the
        # kernel's type holds both (int16: AVX2)
        shift = 0 if act_dtype == k.act_dtype or k.act_dtype == "int16" else (128 if k.act_dtype == "uint8" else -128)
        wp, ck = _pack_weight(w, k.lanes, k.k)
        stage = ConvInput(channels=ck, shift=shift, dtype=k.act_dtype, **how)
        # 4-bit weights stay two per byte, re-packed in the kernel's order and unpacked inside the kernel
        weight = relax.const(_pack_halves(wp), "uint8") if int4 else relax.const(wp.astype(k.w_dtype))
        te_call = partial(te_fn, how=stage, int4_shape=tuple(wp.shape) if int4 else None, w_dtype=k.w_dtype)
        out = self.builder_.call_te(te_call, src, weight, primfunc_name_hint=f"{name}_{k.name}")
        self.count += 1
        if not shift:
            return out  # the call itself, not a var bound to it: FuseOps does not fuse across a var alias
        acc = self.builder_.emit(out)
        fix = (-shift * w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1)).astype(np.int32)
        return relax.op.add(acc, relax.const(fix))

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        k = self.kernel
        dw = _depthwise(call, self.lookup_binding)
        if dw is not None:
            return self._depthwise_call(call, dw)
        for mk in (k, VNNI8) if k is VNNI else (k,):
            mm = _matmul(call, mk, self.lookup_binding)
            if mm is not None:  # the matmul as the dot kernel over token rows (_matmul_te)
                x = call.args[0]
                return self._dot_call(_matmul_te, x, str(x.ty.dtype), *mm, mk, "plateau_matmul")
        found = _eligible(call, k, self.lookup_binding)
        if found is None and k is VNNI:  # 8k output channels: the 256-bit instruction
            k = VNNI8
            found = _eligible(call, k, self.lookup_binding)
        if found is None:
            return call
        w, int4 = found
        data = call.args[0]
        sh, sw = (int(v) for v in call.attrs.strides)
        # conv padding is zeros (the rewrites pad with the zero point themselves, as a Pad before the conv: taken
        # into the kernel's input stage when the conv adds none of its own)
        src, layout, pads, value = self._conv_source(call)
        pairs = 0
        if k.pixels > 1:  # the re-laid input needs a width that is a multiple of the stride
            width = int(src.ty.shape[3 if layout == "NCHW" else 2]) + pads[2] + pads[3]
            pads = (*pads[:3], pads[3] + (-width % sw))
            pairs = sw
        return self._dot_call(partial(_fused_conv_te, sh=sh, sw=sw), src, str(data.ty.dtype), w, int4, k,
                              "plateau_conv2d", layout=layout, pads=pads, value=value, pairs=pairs)


def rewrite_convs_dot(mod: tvm.IRModule, kernel: DotKernel = VNNI) -> tuple[tvm.IRModule, int]:
    """Replace each eligible NHWC integer conv2d by the packed-weight dot kernel; returns (module, how many)."""
    rw = _DotConvRewriter(mod, kernel)
    out = rw.transform()
    return relax.transform.DeadCodeElimination()(out), rw.count


# ---------------------------------------------------------------------------------------------- TIR schedule


@dataclass(frozen=True)
class ConvTile:
    """Register tile of the dot conv: `ow` output pixels x `oc` blocks of L channels (ow * oc / P vector
    accumulators); each kernel keeps its own register budget (default_tile, tune.candidate_tiles).

    `kw_inner` (one pixel per instruction only) unrolls the kernel-width taps inside the channel step, so the
    input bytes broadcast for pixel x + kw serve every (x, kw) pair of the tile that reads them: one broadcast
    feeds up to kw instructions instead of one. It pays where a broadcast otherwise feeds a single instruction
    (oc = 1: 16 output channels on VNNI), ~8% on ResNet-20's first stage."""

    ow: int = 8
    oc: int = 1
    kw_inner: bool = False

    def __post_init__(self) -> None:
        if self.ow < 1 or self.oc < 1 or self.ow * self.oc > 64:
            raise ValueError(f"ConvTile(ow={self.ow}, oc={self.oc}): need ow, oc >= 1 and ow * oc <= 64")


def default_tile(ow_extent: int, oc_blocks: int, kernel: DotKernel = VNNI) -> ConvTile:
    """A tile that divides the output row. VNNI: up to 16 pixels x 2 blocks of 16 channels, at most 16 zmm
    accumulators. sdot: up to 8 pixels x 4 blocks of 4 channels; smmla: up to 8 pixels x 8 blocks of 2 channels;
    at most 16 of the 32 NEON registers."""
    if kernel.lanes >= 16:
        ow = next(t for t in (16, 8, 7, 4, 2, 1) if ow_extent % t == 0)
        oc = 2 if oc_blocks % 2 == 0 and ow <= 8 else 1
        return ConvTile(ow, oc, kw_inner=oc == 1)
    if kernel.pixels > 1:  # smmla: (ow/2) x oc accumulators of 2 pixels x 2 channels
        ow = next(t for t in (8, 4, 2) if ow_extent % t == 0)
        oc = next(t for t in (8, 4, 2, 1) if oc_blocks % t == 0 and ow // 2 * t <= 16)
        return ConvTile(ow, oc)
    ow = next(t for t in (8, 7, 4, 2, 1) if ow_extent % t == 0)
    oc = next(t for t in (4, 2, 1) if oc_blocks % t == 0 and ow * t <= min(16, kernel.registers))
    return ConvTile(ow, oc)


def kernel_of(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV, kernel: DotKernel) -> DotKernel:
    """The kernel a dot conv block was built for: `kernel`, or VNNI8 where the target's is VNNI and the packed
    weight [O/L, KH, KW, Ck/K, L, K] the block reads has L = 8."""
    if kernel is not VNNI:
        return kernel
    lanes = {int(r.source.shape[4]) for r in sch.get(block).reads if len(r.source.shape) == 6}
    return VNNI8 if lanes == {VNNI8.lanes} else kernel


def conv_extents(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV, kernel: DotKernel = VNNI) -> tuple[int, int]:
    """(output width, output channel blocks of L) of the dot conv block."""
    loops = sch.get_loops(block)
    return int(sch.get(loops[2]).extent), int(sch.get(loops[3]).extent) // kernel.lanes


def schedule_dot_conv(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV, tile: ConvTile | None = None,
                      kernel: DotKernel = VNNI) -> Schedule:
    """Tile, tensorize and parallelize the conv `block` of sch with its elementwise consumers fused per tile;
    returns the schedule holding the result (`sch` or a fresh one).

    First choice: anchor on the function's single output block (same NHWC shape as the conv), tile it, and
    compute every producer (conv included) inside its tile; this keeps float blocks that must stay separate
    (see schedule.inline_safe) inside the tile too. Otherwise the conv is the anchor and what follows is moved
    after it where TVM allows (_fuse_epilogue).
    """
    from .schedule import fresh_schedule  # late import: schedule imports this module

    ow_ext, ocb = conv_extents(sch, block, kernel)
    tile = tile or default_tile(ow_ext, ocb, kernel)
    if ow_ext % tile.ow or ocb % tile.oc:
        raise ValueError(f"{tile} does not divide the output (width {ow_ext}, {ocb} channel blocks)")
    def body(s: Schedule, conv: tvm.s_tir.schedule.SBlockRV, _at) -> None:
        # the conv, now at the tile: (1, 1, ow, L*oc, kh, kw, c) loops below the tile
        b, y, x, o, kh, kw, c = s.get_loops(conv)[-7:]
        _tensorize_tile(s, conv, x, o, kh, kw, c, kernel, tile.kw_inner)

    trial = fresh_schedule(sch.mod["main"])
    try:
        _anchor_on_output(trial, trial.get_sblock(sch.get(block).name_hint), tile.ow, kernel.lanes * tile.oc, body)
    except Exception as e:  # noqa: BLE001 (a shape the output anchor does not handle: the conv anchor below)
        log.debug("output-anchored conv schedule failed (%s); conv-anchored instead", e)
    else:
        return trial
    n, h, w, o, kh, kw, c = sch.get_loops(block)
    wo, wi = sch.split(w, [None, tile.ow])
    oo, oi = sch.split(o, [None, kernel.lanes * tile.oc])
    inputs = _input_names(sch)
    ho, hi = sch.split(h, [None, _band_rows(sch, h) if inputs else 1])
    sch.reorder(n, ho, hi, wo, oo, wi, oi, kh, kw, c)
    nh = sch.fuse(n, ho)
    for name in inputs:
        _input_at(sch, sch.get_sblock(name), nh)
    _vectorize_weight_stage(sch)
    _fuse_epilogue(sch, block, oo)
    sch.parallel(nh)
    _tensorize_tile(sch, block, wi, oi, kh, kw, c, kernel, tile.kw_inner)
    return sch


def schedule_dw_conv(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> Schedule:
    """The depthwise conv, anchored on the output like the dot kernel: bands of rows in parallel, the input
    stage per band, a tile of up to 8 pixels x DW_LANES channels whose taps are unrolled, channels vectorized,
    epilogue fused. Returns the scheduled copy (raises where the shape does not fit; the caller falls back)."""
    from .schedule import fresh_schedule

    extents = [sch.get(lp).extent for lp in sch.get_loops(block)]
    ow_ext, c_ext = int(extents[2]), int(extents[3])
    ow = next(t for t in (8, 7, 4, 2, 1) if ow_ext % t == 0)
    width = DW_LANES if c_ext % DW_LANES == 0 else 8

    def body(s: Schedule, conv: tvm.s_tir.schedule.SBlockRV, _at) -> None:
        b, y, x, o, kh, kw = s.get_loops(conv)[-6:]
        s.reorder(kh, kw, x, o)
        s.vectorize(o)  # before decompose_reduction: vectorize needs the block whole (with its init)
        init = s.decompose_reduction(conv, kh)
        s.vectorize(s.get_loops(init)[-1])
        for lp in (kh, kw, x):
            s.unroll(lp)

    trial = fresh_schedule(sch.mod["main"])
    _anchor_on_output(trial, trial.get_sblock(sch.get(block).name_hint), ow, width, body)
    return trial


def _tensorize_tile(sch: Schedule, block, x, o, kh, kw, c, kernel: DotKernel, kw_inner: bool = False) -> None:
    """The conv's loops over one register tile (x pixels, o channels; reductions kh, kw, c) -> the instruction,
    reducing over (kh, kw, c/K) outside and the tile's accumulators unrolled inside (and the kw taps too with
    kw_inner, see ConvTile)."""
    oo, oi = sch.split(o, [None, kernel.lanes])
    co, ci = sch.split(c, [None, kernel.k])
    if kernel.pixels == 1 and kw_inner:
        sch.reorder(kh, co, kw, x, oo, oi, ci)
        tensorized, unrolled = oi, (oo, x, kw)
    elif kernel.pixels == 1:
        sch.reorder(kh, kw, co, x, oo, oi, ci)
        tensorized, unrolled = oi, (oo, x)
    else:
        xo, xi = sch.split(x, [None, kernel.pixels])
        sch.reorder(kh, kw, co, xo, oo, xi, oi, ci)
        tensorized, unrolled = xi, (oo, xo)
    init = sch.decompose_reduction(block, kh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(tensorized, kernel.intrin)
    for lp in unrolled:
        sch.unroll(lp)


def _anchor_on_output(sch: Schedule, conv: tvm.s_tir.schedule.SBlockRV, ow: int, width: int, body) -> None:
    """Tile the function's single output block (ow pixels x `width` channels), compute every producer inside
    the tile (the input stage per band of rows, the weight stage before them) and schedule the conv block at
    the tile with body(sch, conv, loops below the tile)."""
    from .schedule import inline_spatial

    root = sch.get_sblock("root")
    conv_name = sch.get(conv).name_hint
    inline_spatial(sch, skip={conv_name, *_input_names(sch), *_weight_stage(sch)})
    blocks = sch.get_child_blocks(root)
    outs = [b for b in blocks if not sch.get_consumers(b)]
    if len(outs) != 1 or sch.get(outs[0]).name_hint == conv_name:
        raise ValueError("not a single elementwise output block")
    out = outs[0]
    loops = sch.get_loops(out)
    conv_loops = sch.get_loops(conv)
    if len(loops) != 4 or [str(sch.get(lp).extent) for lp in loops] != [str(sch.get(lp).extent)
                                                                          for lp in conv_loops[:4]]:
        raise ValueError("the output block is not shaped like the conv output")
    n, h, w, c = loops
    wo, wi = sch.split(w, [None, ow])
    co, ci = sch.split(c, [None, width])
    ho, hi = sch.split(h, [None, _band_rows(sch, h) if _input_names(sch) else 1])
    sch.reorder(n, ho, hi, wo, co, wi, ci)
    nh = sch.fuse(n, ho)
    # producers, last first, into the output's tile; the input stage per output row
    for blk in reversed(sch.get_child_blocks(root)):
        name = sch.get(blk).name_hint
        if name.startswith(DOT_INPUT):
            _input_at(sch, blk, nh)
        elif name.startswith(DOT_WEIGHT):
            continue  # once per call, before the parallel rows
        elif name != sch.get(out).name_hint:
            sch.compute_at(blk, co)
    sch.parallel(nh)
    _vectorize_weight_stage(sch)
    body(sch, conv, co)
    for blk in sch.get_child_blocks(co):
        name = sch.get(blk).name_hint
        if name.startswith(conv_name):
            continue
        inner = sch.get_loops(blk)[-1]
        ext = sch.get(inner).extent
        if isinstance(ext, tvm.tirx.IntImm) and int(ext) > 1 and int(ext) % min(16, int(ext)) == 0:
            _, vi = sch.split(inner, [None, min(16, int(ext))])
            sch.vectorize(vi)


BANDS = 4  # parallel row bands per image when the conv has an input stage


def _band_rows(sch: Schedule, h: tvm.s_tir.schedule.LoopRV) -> int:
    """Output rows per parallel task: the input stage of a band of r rows copies (r - 1) * stride + kh input
    rows, so wider bands copy less (per row 3x at r = 1, 1.25x at r = 8 for a 3x3 conv); BANDS per image keep
    both cores busy at batch 1."""
    oh = sch.get(h).extent
    if not isinstance(oh, tvm.tirx.IntImm):
        return 1
    oh = int(oh)
    return max(r for r in range(1, max(1, oh // BANDS) + 1) if oh % r == 0)


def _weight_stage(sch: Schedule) -> set[str]:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return {n for n in (sch.get(b).name_hint for b in blocks) if n.startswith(DOT_WEIGHT)}


def _vectorize_weight_stage(sch: Schedule) -> None:
    """The 4-bit weight unpack: one loop nest at the root; each half of a group's (L, K) bytes one vector."""
    for name in _weight_stage(sch):
        blk = sch.get_sblock(name)
        *_, lane, k = sch.get_loops(blk)
        _, lane_in = sch.split(lane, [2, None])  # the half (low or high nibbles), then its L/2 x K bytes
        sch.vectorize(sch.fuse(lane_in, k))


def _input_names(sch: Schedule) -> set[str]:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return {n for n in (sch.get(b).name_hint for b in blocks) if n.startswith(DOT_INPUT)}


def _input_at(sch: Schedule, blk: tvm.s_tir.schedule.SBlockRV, row: tvm.s_tir.schedule.LoopRV) -> None:
    """The conv's input stage computed per output row (the kh input rows it reads), channels vectorized."""
    sch.compute_at(blk, row)
    inner = sch.get_loops(blk)[-1]
    ext = sch.get(inner).extent
    if isinstance(ext, tvm.tirx.IntImm) and 1 < int(ext) <= 64:
        sch.vectorize(inner)


def _fuse_epilogue(sch: Schedule, conv: tvm.s_tir.schedule.SBlockRV, at: tvm.s_tir.schedule.LoopRV) -> None:
    """Compute the conv's elementwise consumers (bias, requantize, a residual add...) per register tile at `at`.

    Blocks that can be inlined without changing a float result are inlined; the others become separate loops
    inside the tile (their intermediates shrink to the tile). What cannot be moved stays a parallel loop nest.
    """
    from .schedule import inline_spatial, parallel_vectorize  # late import: schedule imports this module

    root = sch.get_sblock("root")
    conv_name = sch.get(conv).name_hint
    inputs = _input_names(sch) | _weight_stage(sch)
    inline_spatial(sch, skip={conv_name, *inputs})
    name = lambda b: sch.get(b).name_hint  # noqa: E731
    tiled = {conv_name, *inputs}
    progress = True
    while progress:
        progress = False
        for blk in sch.get_child_blocks(root):
            n = name(blk)
            if n in tiled:
                continue
            try:
                if any(name(p) in tiled for p in sch.get_producers(blk)):
                    sch.reverse_compute_at(blk, at)
                elif sch.get_consumers(blk) and all(name(c) in tiled for c in sch.get_consumers(blk)):
                    sch.compute_at(blk, at)
                else:
                    continue
            except Exception:  # noqa: BLE001 (a block TVM cannot move stays a loop nest of its own)
                continue
            tiled.add(n)
            progress = True
            inner = sch.get_loops(blk)[-1]
            if isinstance(sch.get(inner).extent, tvm.tirx.IntImm) and int(sch.get(inner).extent) > 1:
                sch.vectorize(inner)
    for blk in sch.get_child_blocks(root):
        if name(blk) not in tiled:
            parallel_vectorize(sch, blk)
