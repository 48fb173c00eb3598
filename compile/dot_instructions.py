"""The dot-product instructions the CPU conv kernels are built on, and the kernel registry.

Instructions of one family, "P pixels x L output channels, each += K activation bytes . K weight bytes":

    x86 AVX-512 VNNI  vpdpbusd  P = 1, L = 16, K = 4, u8 x s8   (VNNI)
                      (256-bit) P = 1, L = 8,  K = 4, u8 x s8   (VNNI8: 8k, not 16k, output channels)
    x86 AVX2          vpmaddwd  P = 1, L = 8,  K = 2, s16 x s16 (AVX2: int16 activations and weights)
                      vpmaddubsw P = 1, L = 8, K = 32, u8 x s4 (AVX2_S4: weights in -8..7, 8 instructions
                                summed in int16, then one vpmaddwd by ones into int32)
    aarch64 dotprod   sdot      P = 1, L = 4,  K = 4, s8 x s8   (SDOT)
    aarch64 i8mm      smmla     P = 2, L = 2,  K = 8, s8 x s8   (SMMLA: a 2x8 by 8x2 matrix product)

Each is a `DotKernel` (its shape, byte types and register budget) plus a TVM tensor intrinsic: a description
(the loop nest the schedule's tiles are matched against) and an implementation (the LLVM intrinsic call).
`register_kernel` files both; adding a kernel is one call here. Which target gets which kernel is decided
once, on the `CompileTarget` (targets.py; cpu_features.py for the host).

LLVM 22 changed the VNNI intrinsic to take byte vectors (<64 x i8>); TVM's own VNNI intrinsic passes int32
vectors and fails to compile, so this module registers its own (and the ARM ones beside it, for symmetry).
AVX2 has `vpmaddubsw` for u8 x s8, but it sums pairs into saturating int16 (255 * -128 * 2 overflows), so the
AVX2 kernel widens to int16 and uses `vpmaddwd` (exact int32 sums). With weights in -8..7 (4-bit) vpmaddubsw is
exact, and so is the int16 sum of eight of them (8 * 2 * 255 * 8 = 32640 <= 32767): AVX2_S4 multiplies 256
bytes with 9 multiply instructions (8 vpmaddubsw, 1 vpmaddwd to widen) where vpmaddwd needs 16, the multiply
port being the limit on AVX2 CPUs (measured on the ViT-Tiny W4A8 on a Zen 2: 0.73-0.76x the vpmaddwd kernel's
time; 8 groups 1-2% faster than 4). Its weight operand is 8 registers of 8 lanes x 4 bytes ([G, L, K/G]:
`groups`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["DotKernel", "KERNELS", "register_kernel", "get_kernel", "byte_shift", "VNNI", "VNNI8", "AVX2", "AVX2_S4",
           "SDOT", "SMMLA"]


@dataclass(frozen=True)
class DotKernel:
    """One instruction: `pixels` x `lanes` int32 outputs, each += `k` activation bytes . `k` weight bytes.

    `narrow`: the kernel a conv takes when its output channels are not a multiple of `lanes` but are of the
    narrow kernel's (VNNI's 256-bit form for 8k channels). `small_weights`: the kernel a conv or matmul takes
    when its weights are in -8..7 and its input channels a multiple of that kernel's k (AVX2_S4 on AVX2)."""

    name: str
    intrin: str  # the TensorIntrin name the schedule tensorizes with
    lanes: int
    act_dtype: str  # the activation type the instruction takes ("uint8", "int8" or "int16")
    registers: int  # accumulators a register tile may hold
    pixels: int = 1
    k: int = 4
    w_dtype: str = "int8"  # the weight type the instruction takes
    narrow: DotKernel | None = None
    groups: int = 1  # the K inputs in `groups` sub-groups: weight operand [groups, L, K / groups] (1: [L, K])
    small_weights: DotKernel | None = None  # the kernel for weights in -8..7 (4-bit), where it is faster


# name -> kernel: every kernel whose tensor intrinsic is registered (the extension point "kernel")
KERNELS: dict[str, DotKernel] = {}


def register_kernel(kernel: DotKernel, desc: tirx.PrimFunc, impl: tirx.PrimFunc) -> DotKernel:
    """File `kernel` under its name and register its tensor intrinsic (desc, impl); returns the kernel."""
    if kernel.name in KERNELS and KERNELS[kernel.name] != kernel:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    try:
        TensorIntrin.get(kernel.intrin)
    except Exception:  # not registered yet (get raises a TVMError for unknown names); re-imports skip this
        TensorIntrin.register(kernel.intrin, desc, impl)
    KERNELS[kernel.name] = kernel
    return kernel


def get_kernel(name: str) -> DotKernel:
    """The registered kernel called `name`."""
    if name not in KERNELS:
        raise KeyError(f"unknown dot kernel {name!r}; registered: {', '.join(sorted(KERNELS))}")
    return KERNELS[name]


def byte_shift(dtype: str, to: str) -> int:
    """What is added to a `dtype` byte to reach an instruction's operand type `to`: +128 takes int8 to uint8
    (vpdpbusd), -128 uint8 to int8 (sdot); 0 when the types agree or `to` holds both (int16: AVX2)."""
    if dtype == to or to == "int16":
        return 0
    return 128 if to == "uint8" else -128


def _dot_desc(lanes: int, k: int, act: str, weight: str) -> tirx.PrimFunc:
    """The description every one-pixel dot instruction matches: `lanes` int32 lanes, each += the dot product
    of `k` `act` values and `k` `weight` values; lane i of B holds output channel i's k weights."""

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


def _dot_pair(lanes: int, act: str, llvm_intrinsic: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """(description, implementation) of `lanes` int32 lanes, each += 4 `act` bytes . 4 int8 weight bytes: the
    4 activation bytes are broadcast to every lane, lane i of B holds output channel i's 4 weights."""
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


S4_GROUPS = 8  # vpmaddubsw results summed in int16 before widening: |sum| <= 8 * 2 * 255 * 8 = 32640


@T.prim_func(s_tir=True)
def _pmaddubsw_s4_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4 * S4_GROUPS,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (S4_GROUPS, 8, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4 * S4_GROUPS], B[0:S4_GROUPS, 0:8, 0:4])
        T.writes(C[0:8])
        for i, r in T.grid(8, 4 * S4_GROUPS):
            with T.sblock("update"):
                vi, vr = T.axis.remap("SR", [i, r])
                C[vi] = C[vi] + T.cast(A[vr], "int32") * T.cast(B[vr // 4, vi, vr % 4], "int32")


def _pmaddubsw_sum(A: tirx.Buffer, B: tirx.Buffer) -> tirx.PrimExpr:
    """The int16 sum over groups j of vpmaddubsw(activation bytes 4j..4j+3 broadcast to the 8 lanes, weight
    group j): int16 lane 2i + h = sum_j a[4j + 2h] * w[j, i, 2h] + a[4j + 2h + 1] * w[j, i, 2h + 1]."""
    total = None
    for j in range(S4_GROUPS):
        a_vec = T.reinterpret(T.broadcast(T.reinterpret(A.vload([4 * j], "uint8x4"), dtype="int32"), 8),
                              dtype="uint8x32")
        p = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a_vec,
                                    B.vload([j, 0, 0], dtype="int8x32"), dtype="int16x16")
        total = p if total is None else total + p
    return total


@T.prim_func(s_tir=True)
def _pmaddubsw_s4_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4 * S4_GROUPS,), "uint8", offset_factor=1)
    B = T.match_buffer(b, (S4_GROUPS, 8, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (8,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4 * S4_GROUPS], B[0:S4_GROUPS, 0:8, 0:4])
        T.writes(C[0:8])
        # int16 sums of the groups (exact, see S4_GROUPS), widened by one vpmaddwd with ones: lane i = its K products
        s16 = _pmaddubsw_sum(A, B)
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), s16, T.broadcast(T.int16(1), 16),
            dtype="int32x8")


# LLVM 22's vpdpbusd takes (<16 x i32>, <64 x i8>, <64 x i8>); sdot (<4 x i32>, <16 x i8>, <16 x i8>)
VNNI8 = register_kernel(DotKernel("vnniy", "plateau_vnni_8x4_u8s8s32", 8, "uint8", 28),
                        *_dot_pair(8, "uint8", "llvm.x86.avx512.vpdpbusd.256"))
VNNI = register_kernel(DotKernel("vnni", "plateau_vnni_16x4_u8s8s32", 16, "uint8", 28, narrow=VNNI8),
                       *_dot_pair(16, "uint8", "llvm.x86.avx512.vpdpbusd.512"))
SDOT = register_kernel(DotKernel("sdot", "plateau_sdot_4x4_s8s8s32", 4, "int8", 24),
                       *_dot_pair(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8"))
SMMLA = register_kernel(DotKernel("smmla", "plateau_smmla_2x2x8_s8s8s32", 2, "int8", 24, pixels=2, k=8),
                        _smmla_desc, _smmla_impl)
# AVX2 without VNNI: vpmaddwd, int16 x int16 pairs summed into int32 (exact; vpmaddubsw's int16 sums
# saturate). The input stage widens the activations to int16 (int8 and uint8 alike, no shift); weights are
# stored as int16.
# Weights in -8..7 on AVX2: vpmaddubsw, uint8 activations (int8 ones shifted by +128) x int8 weights
AVX2_S4 = register_kernel(DotKernel("avx2s4", f"plateau_avx2_8x{4 * S4_GROUPS}_u8s4s32", 8, "uint8", 8, k=4 * S4_GROUPS,
                                    groups=S4_GROUPS), _pmaddubsw_s4_desc, _pmaddubsw_s4_impl)
AVX2 = register_kernel(DotKernel("avx2", "plateau_avx2_8x2_s16s16s32", 8, "int16", 12, k=2, w_dtype="int16",
                                 small_weights=AVX2_S4),
                       _dot_desc(8, 2, "int16", "int16"), _pmaddwd_impl)
