"""x86 AVX-512 VNNI integer conv2d: packed weights, a `vpdpbusd` tensor intrinsic and its TIR schedule.

The graph is NHWC between convs (ConvertLayout at the graph boundary). Each integer conv2d whose input channels
pad to a multiple of 4 and whose output channels are a multiple of 16 becomes

    x (NHWC int8/uint8) --pad--> --(+128 if int8)--> u8 --conv_vnni(Wp)--> int32 --(- 128 * sum W if int8)--> ...

    conv_vnni[n, h, w, o] = sum_{kh, kw, c} u8[n, h*sh + kh, w*sw + kw, c] * Wp[o // 16, kh, kw, c // 4, o % 16, c % 4]

`vpdpbusd` multiplies unsigned by signed bytes, so int8 activations are shifted by +128 (exact: the shift times the
weight sum is subtracted again, a per-channel constant). The weights are repacked once, in numpy, so that the 16
output channels x 4 input channels of one instruction are 64 contiguous bytes. The schedule keeps an
(ow_block x 16*oc_block) int32 tile in registers, reduces over (kh, kw, c/4) with one `vpdpbusd` per (pixel, 16
channels, 4 inputs), runs the fused epilogue (bias, requantize, clip, cast) on the tile, and parallelizes (n, oh).

LLVM 22 changed the intrinsic to take byte vectors (<64 x i8>); TVM's own VNNI intrinsic passes int32 vectors and
fails to compile, so this file registers its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from ._common import const_np

log = logging.getLogger(__name__)

__all__ = ["VNNI_INTRIN", "VNNI_BLOCK", "ConvTile", "rewrite_convs_vnni", "schedule_vnni_conv", "has_vnni"]

VNNI_INTRIN = "plateau_vnni_16x4_u8s8s32"
VNNI_BLOCK = "plateau_vnni_conv"  # the conv block's name; FuseTIR keeps it, the scheduler finds it by it

# CPUs LLVM knows with AVX-512 VNNI (mcpu names); "+avx512vnni" in mattr also counts.
_VNNI_CPUS = {"znver4", "znver5", "cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
              "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "rocketlake", "alderlake-avx512"}


@T.prim_func(s_tir=True)
def _dot_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # the 4 activation bytes broadcast to all 16 lanes; LLVM 22's signature is (<16 x i32>, <64 x i8>, <64 x i8>)
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a, B.vload([0, 0], dtype="int8x64"), dtype="int32x16",
        )


def _register() -> None:
    try:
        TensorIntrin.get(VNNI_INTRIN)
    except Exception:  # not registered yet (get raises a TVMError for unknown names)
        TensorIntrin.register(VNNI_INTRIN, _dot_desc, _dot_vnni)


_register()


def has_vnni(target: tvm.target.Target) -> bool:
    """Whether `target` is x86-64 with AVX-512 VNNI (by mcpu name or +avx512vnni in mattr)."""
    if target.kind.name != "llvm":
        return False
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686")):
        return False
    mattr = [str(a) for a in (attrs.get("mattr") or [])]
    return str(attrs.get("mcpu", "") or "") in _VNNI_CPUS or "+avx512vnni" in mattr


# ---------------------------------------------------------------------------------------------- graph rewrite


def _pack_weight(w_ohwi: np.ndarray) -> tuple[np.ndarray, int]:
    """OHWI int8 -> [O/16, KH, KW, C4/4, 16, 4] with input channels zero-padded to C4 (a multiple of 4)."""
    o, kh, kw, c = w_ohwi.shape
    c4 = -(-c // 4) * 4
    w = np.zeros((o, kh, kw, c4), np.int8)
    w[..., :c] = w_ohwi
    return np.ascontiguousarray(w.reshape(o // 16, 16, kh, kw, c4 // 4, 4).transpose(0, 2, 3, 4, 1, 5)), c4


def _conv_te(data: te.Tensor, wp: te.Tensor, sh: int, sw: int) -> te.Tensor:
    n, h, w, _ = data.shape
    ocb, kh, kw, cb, _, _ = wp.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rc = te.reduce_axis((0, cb * 4), "rc")
    return te.compute(
        (n, oh, ow, ocb * 16),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + rh, x * sw + rw, rc].astype("int32")
            * wp[o // 16, rh, rw, rc // 4, o % 16, rc % 4].astype("int32"),
            axis=[rh, rw, rc],
        ),
        name=VNNI_BLOCK,
    )


def _eligible(call: relax.Call) -> np.ndarray | None:
    """The OHWI int8 weight of an integer NHWC conv2d the VNNI kernel handles, else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
        return None
    a = call.attrs
    if (a.data_layout, a.kernel_layout, a.out_layout) != ("NHWC", "OHWI", "NHWC") or int(a.groups) != 1:
        return None
    if str(a.out_dtype) != "int32" or any(int(d) != 1 for d in a.dilation):
        return None
    w = const_np(call.args[1])
    if str(call.args[0].ty.dtype) not in ("int8", "uint8") or w is None:
        return None
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[0] % 16:
        return None
    return w


@relax.expr_functor.mutator
class _VNNIConvRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.count = 0

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        w = _eligible(call)
        if w is None:
            return call
        bb, op, a = self.builder_, relax.op, call.attrs
        data = call.args[0]
        signed = str(data.ty.dtype) == "int8"
        wp, c4 = _pack_weight(w)
        t, left, b, r = (int(p) for p in a.padding)  # relax conv2d padding is (top, left, bottom, right)
        if t or left or b or r or c4 != w.shape[3]:
            # conv padding is zeros (the rewrites pad with the zero point themselves); extra channels meet zero weights
            data = bb.emit(op.nn.pad(data, [0, 0, t, b, left, r, 0, c4 - w.shape[3]], pad_value=0.0))
        if signed:  # u8 = s8 + 128, exact in int16
            data = bb.emit(op.astype(op.add(op.astype(data, "int16"), relax.const(128, "int16")), "uint8"))
        sh, sw = (int(s) for s in a.strides)
        acc = bb.emit_te(_conv_te, data, relax.const(wp), sh, sw, primfunc_name_hint="plateau_conv2d_vnni")
        self.count += 1
        if not signed:
            return acc
        shift = (-128 * w.astype(np.int64).reshape(w.shape[0], -1).sum(axis=1)).astype(np.int32)
        return op.add(acc, relax.const(shift))


def rewrite_convs_vnni(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Replace each eligible NHWC integer conv2d by the packed-weight VNNI kernel; returns (module, how many)."""
    rw = _VNNIConvRewriter(mod)
    out = rw.transform()
    return relax.transform.DeadCodeElimination()(out), rw.count


# ---------------------------------------------------------------------------------------------- TIR schedule


@dataclass(frozen=True)
class ConvTile:
    """Register tile of the VNNI conv: `ow` output pixels x `oc` blocks of 16 channels (ow * oc zmm accumulators)."""

    ow: int = 8
    oc: int = 1

    def __post_init__(self) -> None:
        if self.ow < 1 or self.oc < 1 or self.ow * self.oc > 28:
            raise ValueError(f"ConvTile(ow={self.ow}, oc={self.oc}): need ow, oc >= 1 and ow * oc <= 28 registers")


def default_tile(ow_extent: int, oc_blocks: int) -> ConvTile:
    """A tile that divides the output row: up to 16 pixels, up to 2 channel blocks, at most 16 accumulators."""
    ow = next(t for t in (16, 8, 7, 4, 2, 1) if ow_extent % t == 0)
    oc = 2 if oc_blocks % 2 == 0 and ow <= 8 else 1
    return ConvTile(ow, oc)


def conv_extents(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV) -> tuple[int, int]:
    """(output width, output channel blocks of 16) of the VNNI conv block."""
    loops = sch.get_loops(block)
    return int(sch.get(loops[2]).extent), int(sch.get(loops[3]).extent) // 16


def schedule_vnni_conv(sch: Schedule, block: tvm.s_tir.schedule.SBlockRV, tile: ConvTile | None = None) -> Schedule:
    """Tile, tensorize and parallelize the conv `block` of sch with its elementwise consumers fused per tile;
    returns the schedule holding the result (`sch` or a fresh one).

    First choice: anchor on the function's single output block (same NHWC shape as the conv), tile it, and
    compute every producer (conv included) inside its tile; this keeps float blocks that must stay separate
    (see schedule.inline_safe) inside the tile too. Otherwise the conv is the anchor and what follows is moved
    after it where TVM allows (_fuse_epilogue).
    """
    from .schedule import fresh_schedule  # late import: schedule imports this module

    ow_ext, ocb = conv_extents(sch, block)
    tile = tile or default_tile(ow_ext, ocb)
    if ow_ext % tile.ow or ocb % tile.oc:
        raise ValueError(f"{tile} does not divide the output (width {ow_ext}, {ocb} channel blocks)")
    trial = fresh_schedule(sch.mod["main"])
    try:
        _anchor_on_output(trial, trial.get_sblock(sch.get(block).name_hint), tile)
    except Exception as e:  # noqa: BLE001 (a shape the output anchor does not handle: the conv anchor below)
        log.debug("output-anchored conv schedule failed (%s); conv-anchored instead", e)
    else:
        return trial
    n, h, w, o, kh, kw, c = sch.get_loops(block)
    oco, oci = sch.split(o, [None, 16])
    co, ci = sch.split(c, [None, 4])
    wo, wi = sch.split(w, [None, tile.ow])
    ocoo, ocoi = sch.split(oco, [None, tile.oc])
    sch.reorder(n, h, wo, ocoo, kh, kw, co, wi, ocoi, oci, ci)
    nh = sch.fuse(n, h)
    _fuse_epilogue(sch, block, ocoo)
    sch.parallel(nh)
    _tensorize_inner(sch, block, kh, wi, ocoi, oci)
    return sch


def _tensorize_inner(sch: Schedule, block, kh, wi, ocoi, oci) -> None:
    init = sch.decompose_reduction(block, kh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oci, VNNI_INTRIN)
    sch.unroll(ocoi)
    sch.unroll(wi)


def _anchor_on_output(sch: Schedule, conv: tvm.s_tir.schedule.SBlockRV, tile: ConvTile) -> None:
    from .schedule import inline_spatial

    root = sch.get_sblock("root")
    conv_name = sch.get(conv).name_hint
    inline_spatial(sch, skip={conv_name})
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
    wo, wi = sch.split(w, [None, tile.ow])
    co, ci = sch.split(c, [None, 16 * tile.oc])
    sch.reorder(n, h, wo, co, wi, ci)
    nh = sch.fuse(n, h)
    # producers, last first, into the output's tile
    for blk in reversed(sch.get_child_blocks(root)):
        if sch.get(blk).name_hint != sch.get(out).name_hint:
            sch.compute_at(blk, co)
    sch.parallel(nh)
    # the conv, now at the tile: (1, 1, ow, 16*oc, kh, kw, c) loops below co
    b, y, x, o, kh, kw, c = sch.get_loops(conv)[-7:]
    oco, oci = sch.split(o, [None, 16])
    c4o, c4i = sch.split(c, [None, 4])
    sch.reorder(kh, kw, c4o, x, oco, oci, c4i)
    _tensorize_inner(sch, conv, kh, x, oco, oci)
    for blk in sch.get_child_blocks(co):
        name = sch.get(blk).name_hint
        if name.startswith(conv_name):
            continue
        inner = sch.get_loops(blk)[-1]
        ext = sch.get(inner).extent
        if isinstance(ext, tvm.tirx.IntImm) and int(ext) > 1 and int(ext) % 16 == 0:
            _, vi = sch.split(inner, [None, 16])
            sch.vectorize(vi)


def _fuse_epilogue(sch: Schedule, conv: tvm.s_tir.schedule.SBlockRV, at: tvm.s_tir.schedule.LoopRV) -> None:
    """Compute the conv's elementwise consumers (bias, requantize, a residual add...) per register tile at `at`.

    Blocks that can be inlined without changing a float result are inlined; the others become separate loops
    inside the tile (their intermediates shrink to the tile). What cannot be moved stays a parallel loop nest.
    """
    from .schedule import inline_spatial, parallel_vectorize  # late import: schedule imports this module

    root = sch.get_sblock("root")
    conv_name = sch.get(conv).name_hint
    inline_spatial(sch, skip={conv_name})
    name = lambda b: sch.get(b).name_hint  # noqa: E731
    tiled = {conv_name}
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
