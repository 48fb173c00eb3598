"""A dlight schedule rule for int8 x int8 -> int32 GEMM-like reductions on CUDA with `__dp4a`.

dlight's own Matmul rule schedules the integer conv2d / matmul as an implicit GEMM but multiplies one byte at
a time; its int8 tensor-core path needs every GEMM extent > 64 (ResNet-20's layers have 16-64 output
channels). This rule normalizes the reduction the same way (C[S, I, J] += A[S, I, K] * B[S, J, K], dlight's
index maps), pads K to a multiple of 4, stages A and B tiles in shared memory and tensorizes the innermost
4-wide reduction with TVM's registered dp4a intrinsic (`__dp4a(int8x4, int8x4, int32)`, sm_61+). The epilogue
(bias, requantize, residual add) is inlined into the store of the local accumulator. Anything else returns
None, so the next rule (dlight's Matmul, then Fallback) takes the function.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_in_out_dtypes,
    get_index_map,
    get_reduction_blocks,
)
from tvm.target import Target

__all__ = ["Dp4aMatmul"]

_INTRIN = {"int8": "plateau_dp4a_s8s8s32", "uint8": "plateau_dp4a_u8s8s32"}


def _dp4a_pair(act: str) -> tuple:
    """(description, implementation) of a 4-wide `act` x int8 dot product accumulated into int32."""
    from tvm.script import tirx as T

    lanes = "int8x4" if act == "int8" else "uint8x4"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), act, offset_factor=1, align=4, scope="shared")
        B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
        C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for k in range(4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), act, offset_factor=1, align=4, scope="shared")
        B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
        C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] = C[0] + T.call_pure_extern(
                "__dp4a", A.vload([0], lanes), B.vload([0], "int8x4"), T.int32(0), dtype="int32")

    return desc, impl


def _register_intrinsics() -> None:
    """Register the dp4a intrinsics (one per activation type) once. Registered here rather than by importing
    tvm.s_tir.tensor_intrin, whose package import builds every tensor-core intrinsic (about a minute on two
    busy cores)."""
    from tvm.s_tir import TensorIntrin

    for act, name in _INTRIN.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *_dp4a_pair(act))


class Dp4aMatmul(GPUScheduleRule):
    """int8 / uint8 activations x int8 weights -> int32, tensorized with dp4a (4-byte dot products)."""

    TILE_I, TILE_J, THREADS_I, THREADS_J = 2, 2, 8, 8  # each thread: 2 x 2 outputs; a block: 16 x 16 outputs

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        _register_intrinsics()

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reductions = get_reduction_blocks(sch, blocks)
        if reductions is None or len(reductions) != 1:
            return None
        main = reductions[0]
        stmt = sch.get(main)
        reads = [str(r.source.dtype) for r in stmt.reads]
        in_dtype, out_dtype = get_in_out_dtypes(stmt)
        if out_dtype != "int32" or len(reads) != 2 or reads[1] != "int8" or reads[0] not in _INTRIN:
            return None
        if in_dtype not in _INTRIN or not get_index_map(stmt):
            return None
        try:
            return self._schedule(sch, main, _INTRIN[reads[0]])
        except (RuntimeError, ValueError, AssertionError):  # a shape this rule does not handle: dlight's
            return None

    def _schedule(self, sch: s_tir.Schedule, main, intrin: str) -> s_tir.Schedule:
        ra = sch.reindex(main, ("read", 0))
        rb = sch.reindex(main, ("read", 1))
        rc = sch.reindex(main, ("write", 0))
        matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
        sch.transform_layout(ra, ("write", 0), a_map)
        sch.transform_layout(rb, ("write", 0), b_map)
        sch.transform_layout(rc, ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)

        ti, tj = self.TILE_I * self.THREADS_I, self.TILE_J * self.THREADS_J
        sch.pad_einsum(main, [1, ti, tj, 4])
        batch, i, j, k = sch.get_loops(main)
        bi, ty, ii = sch.split(i, [None, self.THREADS_I, self.TILE_I])
        bj, tx, jj = sch.split(j, [None, self.THREADS_J, self.TILE_J])
        ko, k4 = sch.split(k, [None, 4])
        sch.reorder(bi, bj, ty, tx, ko, ii, jj, k4)
        bi = sch.fuse(batch, bi)
        sch.bind(bi, "blockIdx.y")
        sch.bind(bj, "blockIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

        local = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(local, tx, preserve_unit_loops=True)

        for index in (0, 1):  # A and B tiles of this ko step into shared memory, 4 bytes per thread at a time
            shared = sch.cache_read(main, index, "shared")
            sch.compute_at(shared, ko, preserve_unit_loops=True)
            loops = sch.get_loops(shared)[-2:]
            fused = sch.fuse(*loops)
            _, fy, fx = sch.split(fused, [None, self.THREADS_I, self.THREADS_J])
            sch.bind(fy, "threadIdx.y")
            sch.bind(fx, "threadIdx.x")
            auto_inline_producers(sch, shared)

        auto_inline_consumer_chain(sch, local)
        sch.decompose_reduction(main, ko)
        sch.tensorize(k4, intrin)
        return sch
