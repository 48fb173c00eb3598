"""TIR schedule of the dot-product conv (and matmul) kernels and of the depthwise conv, after FuseTIR.

The dot conv keeps an (ow_block x L*oc_block) int32 tile in registers, reduces over (kh, kw, c/K) with one
instruction per (pixels, L channels, K inputs) (tensorized with the kernel's intrinsic, dot_instructions.py),
runs the fused epilogue (bias, requantize, clip, cast) on the tile, and parallelizes (n, bands of oh). The
input stage (dot_compute.py) is computed per band of output rows, for the input rows the band reads (a few KB,
hot in cache); 4-bit weights are unpacked once per call: before the rows, or for a matmul of few token rows
per output channel block (weight-stationary, chosen at run time by the row count).

    >>> sch = schedule_dot_conv(sch, find_conv_block(sch), ConvTile(8, 2), kernel)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import LoopRV, SBlockRV

from .dot_act_matmul import act_kernel
from .dot_compute import DOT_BLOCK, DOT_INPUT, DOT_WEIGHT
from .dot_instructions import DotKernel
from .tir_helpers import fresh_schedule, has_root, inline_spatial, parallel_vectorize

__all__ = ["ConvTile", "TileChooser", "DW_LANES", "BANDS", "default_tile", "kernel_of", "conv_extents",
           "find_conv_block", "schedule_dot_conv", "schedule_dw_conv"]

log = logging.getLogger(__name__)

DW_LANES = 16  # channels per depthwise tile: int32 vectors of 16 (one zmm; four NEON registers)
BANDS = 4  # parallel row bands per image when the conv has an input stage
WEIGHT_STATIONARY_TILES = 16  # a 4-bit matmul of up to this many row tiles (8 tokens each) runs weight-stationary


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


# name of a fused PrimFunc -> its conv tile (None: the default tile); what tuning searches over
TileChooser = Callable[[str, Schedule], "ConvTile | None"]


def default_tile(ow_extent: int, oc_blocks: int, kernel: DotKernel) -> ConvTile:
    """A tile that divides the output row. VNNI: up to 16 pixels x 2 blocks of 16 channels, at most 16 zmm
    accumulators. sdot: up to 8 pixels x 4 blocks of 4 channels; smmla: up to 8 pixels x 8 blocks of 2
    channels; at most 16 of the 32 NEON registers."""
    if kernel.lanes >= 16:
        ow = next(t for t in (16, 8, 7, 6, 5, 4, 2, 1) if ow_extent % t == 0)
        oc = 2 if oc_blocks % 2 == 0 and ow <= 8 else 1
        return ConvTile(ow, oc, kw_inner=oc == 1)
    if kernel.pixels > 1:  # smmla: (ow/2) x oc accumulators of 2 pixels x 2 channels
        ow = next(t for t in (8, 6, 4, 2) if ow_extent % t == 0)
        oc = next(t for t in (8, 4, 2, 1) if oc_blocks % t == 0 and ow // 2 * t <= 16)
        return ConvTile(ow, oc)
    ow = next(t for t in (8, 7, 6, 5, 4, 2, 1) if ow_extent % t == 0)
    oc = next(t for t in (4, 2, 1) if oc_blocks % t == 0 and ow * t <= min(16, kernel.registers))
    return ConvTile(ow, oc)


def kernel_of(sch: Schedule, block: SBlockRV, kernel: DotKernel) -> DotKernel:
    """The kernel a dot conv block was built for: the target's `kernel`, its small-weights form where the
    block reads a grouped weight (7 axes), or its narrow form (dot_rewrite took it for channels that are a
    multiple of the narrow lanes only) where the packed weight [O/L, KH, KW, Ck/K, L, K] the block reads has
    the narrow kernel's L; sdot where the target's is smmla and the block reads sdot's 4 lanes."""
    if kernel.small_weights is not None and any(len(r.source.shape) == 7 for r in sch.get(block).reads):
        return kernel.small_weights  # its grouped weight [O/L, KH, KW, Ck/K, G, L, K/G]
    lanes = {int(r.source.shape[4]) for r in sch.get(block).reads if len(r.source.shape) == 6}
    if kernel.pixels > 1 and lanes == {act_kernel(kernel).lanes}:
        return act_kernel(kernel)  # a Linear on an smmla target (dot_rewrite: its token rows are no pixel pairs)
    if kernel.narrow is None:
        return kernel
    return kernel.narrow if lanes == {kernel.narrow.lanes} else kernel


def conv_extents(sch: Schedule, block: SBlockRV, kernel: DotKernel) -> tuple[int, int]:
    """(output width, output channel blocks of L) of the dot conv block."""
    loops = sch.get_loops(block)
    return int(sch.get(loops[2]).extent), int(sch.get(loops[3]).extent) // kernel.lanes


def find_conv_block(sch: Schedule, prefix: str = DOT_BLOCK) -> SBlockRV | None:
    """The one block of `sch` named `prefix`... (the dot conv by default, DW_BLOCK for depthwise)."""
    if not has_root(sch):
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    found = [b for b in blocks if sch.get(b).name_hint.startswith(prefix)]
    return found[0] if len(found) == 1 else None


def schedule_dot_conv(sch: Schedule, block: SBlockRV, tile: ConvTile | None, kernel: DotKernel) -> Schedule:
    """Tile, tensorize and parallelize the conv `block` of sch with its elementwise consumers fused per tile
    (`tile` None: default_tile); returns the schedule holding the result (`sch` or a fresh one).

    First choice: anchor on the function's single output block (same NHWC shape as the conv), tile it, and
    compute every producer (conv included) inside its tile; this keeps float blocks that must stay separate
    (see tir_helpers.inline_safe) inside the tile too. Otherwise the conv is the anchor and what follows is
    moved after it where TVM allows (_fuse_epilogue).
    """
    ow_ext, ocb = conv_extents(sch, block, kernel)
    tile = tile or default_tile(ow_ext, ocb, kernel)
    if ow_ext % tile.ow or ocb % tile.oc:
        raise ValueError(f"{tile} does not divide the output (width {ow_ext}, {ocb} channel blocks)")

    def body(s: Schedule, conv: SBlockRV, _at) -> None:
        # the conv, now at the tile: (1, 1, ow, L*oc, kh, kw, c) loops below the tile
        b, y, x, o, kh, kw, c = s.get_loops(conv)[-7:]
        _tensorize_tile(s, conv, x, o, kh, kw, c, kernel, tile.kw_inner)

    trial = fresh_schedule(sch.mod["main"])
    try:
        _anchor_on_output(trial, trial.get_sblock(sch.get(block).name_hint), tile.ow, kernel.lanes * tile.oc,
                          body)
    except Exception as e:  # noqa: BLE001 (a shape the output anchor does not handle: the conv anchor below)
        log.debug("output-anchored conv schedule failed (%s); conv-anchored instead", e)
    else:
        return trial
    # the matmul's row gather (matmul_te) into the input stage first: computed per band, the stage must
    # read the source directly
    inline_spatial(sch, skip={sch.get(block).name_hint, *_input_names(sch), *_weight_stage(sch)})
    rows = sch.get(sch.get_loops(block)[0]).extent  # row tiles (matmul) or images (conv)
    few = not isinstance(rows, tvm.tirx.IntImm) or int(rows) <= WEIGHT_STATIONARY_TILES
    if not (few and _weight_stage(sch) and _is_matmul(sch, block)):
        return _schedule_rows(sch, block, tile, kernel)
    ws = fresh_schedule(sch.mod["main"])
    _weight_stationary(ws, ws.get_sblock(sch.get(block).name_hint), tile, kernel)
    if isinstance(rows, tvm.tirx.IntImm):
        return ws
    return fresh_schedule(_by_rows(ws.mod["main"], _schedule_rows(sch, block, tile, kernel).mod["main"], rows))


def _is_matmul(sch: Schedule, block: SBlockRV) -> bool:
    """Whether the dot block is matmul_te's (one output row of `rows` tokens, a 1x1 kernel)."""
    _, h, _, _, kh, kw, _ = (sch.get(lp).extent for lp in sch.get_loops(block))
    return all(isinstance(e, tvm.tirx.IntImm) and int(e) == 1 for e in (h, kh, kw))


def _weight_stationary(sch: Schedule, block: SBlockRV, tile: ConvTile, kernel: DotKernel) -> None:
    """A 4-bit matmul for few token rows: output channel blocks in parallel, each unpacking its slice of the
    weight once (into L1) and running every row tile against it; the row-major schedule below unpacks the
    whole weight before its parallel rows instead."""
    n, h, w, o, kh, kw, c = sch.get_loops(block)
    wo, wi = sch.split(w, [None, tile.ow])
    oo, oi = sch.split(o, [None, kernel.lanes * tile.oc])
    sch.reorder(oo, n, h, wo, wi, oi, kh, kw, c)
    nh = sch.fuse(n, h)
    for name in _input_names(sch):
        _input_at(sch, sch.get_sblock(name), nh)
    for name in _weight_stage(sch):
        sch.compute_at(sch.get_sblock(name), oo)
    _vectorize_weight_stage(sch)
    _fuse_epilogue(sch, block, nh)  # per whole row tile: see _schedule_rows
    sch.parallel(oo)
    _tensorize_tile(sch, block, wi, oi, kh, kw, c, kernel, tile.kw_inner)


def _by_rows(small: tvm.tirx.PrimFunc, large: tvm.tirx.PrimFunc, rows: tvm.tirx.PrimExpr) -> tvm.tirx.PrimFunc:
    """One function running `small` up to WEIGHT_STATIONARY_TILES row tiles and `large` above, each branch in
    a block of its own holding its buffers. Put together as TVMScript: the two schedules are deep copies of
    one function (fresh_schedule), alike in parameter names but not in objects, and the parser binds the
    names once."""
    def body(f: tvm.tirx.PrimFunc) -> tuple[list[str], list[str]]:
        lines = f.script().splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("def "))
        head = lines[:start + 1]
        rest = [ln for ln in lines[start + 1:] if ln.strip() and not ln.strip().startswith("# with T.sblock(\"root\")")]
        attrs = [ln for ln in rest if ln.strip().startswith("T.func_attr")]
        return head + attrs, [ln for ln in rest if ln not in attrs]

    head, large_body = body(large)
    _, small_body = body(small)
    cond = str(rows <= WEIGHT_STATIONARY_TILES)
    text = "\n".join([*head, f"    if {cond}:", '        with T.sblock("weight_stationary"):',
                      *("        " + ln for ln in small_body), "    else:", '        with T.sblock("row_major"):',
                      *("        " + ln for ln in large_body)])
    return tvm.script.from_source(text)


def _schedule_rows(sch: Schedule, block: SBlockRV, tile: ConvTile, kernel: DotKernel) -> Schedule:
    matmul = _is_matmul(sch, block)
    n, h, w, o, kh, kw, c = sch.get_loops(block)
    wo, wi = sch.split(w, [None, tile.ow])
    oo, oi = sch.split(o, [None, kernel.lanes * tile.oc])
    inputs = _input_names(sch)
    ho, hi = sch.split(h, [None, _band_rows(sch, h) if inputs else 1])
    # a matmul's epilogue goes at a loop holding whole row tiles (wo inside it). Its output reads the tile
    # through matmul_te's flat token index (// and % by the rows), which TVM's reverse_compute_at does not map
    # back onto part of a tile: placed per part (a register tile narrower than the token rows, which tuning may
    # choose), the epilogue gave wrong integers (test_linear_row_tiles_narrower_than_the_token_rows_are_exact)
    sch.reorder(n, ho, hi, *((oo, wo) if matmul else (wo, oo)), wi, oi, kh, kw, c)
    nh = sch.fuse(n, ho)
    for name in inputs:
        _input_at(sch, sch.get_sblock(name), nh)
    _vectorize_weight_stage(sch)
    _fuse_epilogue(sch, block, oo)
    sch.parallel(nh)
    _tensorize_tile(sch, block, wi, oi, kh, kw, c, kernel, tile.kw_inner)
    return sch


def schedule_dw_conv(sch: Schedule, block: SBlockRV) -> Schedule:
    """The depthwise conv, anchored on the output like the dot kernel: bands of rows in parallel, the input
    stage per band, a tile of up to 8 pixels x DW_LANES channels whose taps are unrolled, channels vectorized,
    epilogue fused. Returns the scheduled copy (raises where the shape does not fit; the caller falls
    back)."""
    extents = [sch.get(lp).extent for lp in sch.get_loops(block)]
    ow_ext, c_ext = int(extents[2]), int(extents[3])
    ow = next(t for t in (8, 7, 4, 2, 1) if ow_ext % t == 0)
    width = DW_LANES if c_ext % DW_LANES == 0 else 8

    def body(s: Schedule, conv: SBlockRV, _at) -> None:
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
    """The conv's loops over one register tile (x pixels, o channels; reductions kh, kw, c) -> the
    instruction, reducing over (kh, kw, c/K) outside and the tile's accumulators unrolled inside (and the kw
    taps too with kw_inner, see ConvTile)."""
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


def _anchor_on_output(sch: Schedule, conv: SBlockRV, ow: int, width: int, body) -> None:
    """Tile the function's single output block (ow pixels x `width` channels), compute every producer inside
    the tile (the input stage per band of rows, the weight stage before them) and schedule the conv block at
    the tile with body(sch, conv, loops below the tile)."""
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


def _band_rows(sch: Schedule, h: LoopRV) -> int:
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


def _input_at(sch: Schedule, blk: SBlockRV, row: LoopRV) -> None:
    """The conv's input stage computed per output row (the kh input rows it reads), channels vectorized."""
    sch.compute_at(blk, row)
    inner = sch.get_loops(blk)[-1]
    ext = sch.get(inner).extent
    if isinstance(ext, tvm.tirx.IntImm) and 1 < int(ext) <= 64:
        sch.vectorize(inner)


def _fuse_epilogue(sch: Schedule, conv: SBlockRV, at: LoopRV) -> None:
    """Compute the conv's elementwise consumers (bias, requantize, a residual add...) per register tile (at
    the loop `at`).

    Blocks that can be inlined without changing a float result are inlined; the others become separate loops
    inside the tile (their intermediates shrink to the tile). What cannot be moved stays a parallel loop nest.
    """
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
