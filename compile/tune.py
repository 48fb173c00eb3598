"""Tuning: a search over the conv tiles of the dot kernels (dot_schedule.py), measured on the device, kept in
a database.

The hand schedules are parameterized by one small choice per conv shape, the register tile (pixels x channel
blocks). `tune_tiles` builds every candidate of every conv kernel of the model, times it on random inputs at a
tuning batch, and keeps the fastest; the answers go to `<dir>/tiles.json`, keyed by the target and the conv
shape, so a model is tuned once per target and later builds read the file (no measuring, seconds).

Timings come from where the kernel will run: this machine for the host target, or a board over TVM RPC
(`rpc="HOST:PORT"` of `plateau device serve`): each candidate is cross-compiled, uploaded and timed there.

    >>> tiles, info = tuned_tiles(mod, target, Path("runs/r1/compile/host/tuning"), minutes=5)
    >>> tiles, info = tuned_tiles(mod, get_target("rpi5"), Path(".../tuning"), minutes=5, rpc="10.0.0.7:9090")
    >>> ex, _ = build(mod, target, tiles=tiles)

A time budget stops the search early; shapes not reached keep the default tile. Timings are the minimum over
repeats (the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import tvm
from tvm.s_tir import Schedule

from plateau.artifacts import atomic_path
from plateau.errors import PlateauError
from plateau.rpc import rpc_connect

from .cpu_pipeline import legalize_passes
from .dot_instructions import DotKernel
from .dot_rewrite import rewrite_convs_dot
from .dot_schedule import (
    ConvTile,
    TileChooser,
    conv_extents,
    default_tile,
    find_conv_block,
    kernel_of,
    schedule_dot_conv,
)
from .targets import CompileTarget
from .tir_helpers import fresh_schedule

__all__ = ["DB_FORMAT", "DB_VERSION", "conv_key", "candidate_tiles", "tune_tiles", "tuned_tiles", "load_db"]

log = logging.getLogger(__name__)

DB_FORMAT, DB_VERSION = "plateau.tuning", 1
DB_FILE = "tiles.json"
TUNE_BATCH = 8
ROUNDS = 3  # timing rounds over all candidates of a shape


def conv_key(sch: Schedule) -> str | None:
    """The shape key of the dot conv in `sch` (output HxWxC, kernel, input channels), None without one."""
    block = find_conv_block(sch)
    if block is None:
        return None
    ext = [sch.get(lp).extent for lp in sch.get_loops(block)]
    _, oh, ow, oc, kh, kw, c = (int(e) if isinstance(e, tvm.tirx.IntImm) else str(e) for e in ext)
    return f"out{oh}x{ow}x{oc}-k{kh}x{kw}x{c}"


def candidate_tiles(ow_extent: int, oc_blocks: int, kernel: DotKernel) -> list[ConvTile]:
    """Tiles that divide the output (pixels dividing the width, a multiple of the kernel's pixels; channel
    blocks dividing the channels) whose accumulators fit the kernel's registers."""
    out = []
    for ow in (1, 2, 4, 5, 6, 7, 8, 14, 16, 28, 32):
        for oc in (1, 2, 4, 8):
            acc = ow // kernel.pixels * oc
            if ow_extent % ow == 0 and ow % kernel.pixels == 0 and oc_blocks % oc == 0 \
                    and 4 <= acc <= min(24, kernel.registers):
                out.append(ConvTile(ow, oc))
                if kernel.pixels == 1:  # the same tile with the kw taps unrolled inside (ConvTile.kw_inner)
                    out.append(ConvTile(ow, oc, kw_inner=True))
    return out or [default_tile(ow_extent, oc_blocks, kernel)]


def _target_key(target: tvm.target.Target) -> str:
    keys = ("kind", "mcpu", "mtriple", "mattr")
    return json.dumps({k: str(v) for k, v in sorted(target.export().items()) if k in keys}, sort_keys=True)


def load_db(path: Path) -> dict:
    """The tiles database at `path` (empty when absent or of another format/version, with a warning)."""
    if not path.exists():
        return {"format": DB_FORMAT, "version": DB_VERSION, "targets": {}}
    db = json.loads(path.read_text())
    if db.get("format") != DB_FORMAT or db.get("version") != DB_VERSION:
        log.warning("%s: format %s v%s, expected %s v%s; ignored", path, db.get("format"), db.get("version"),
                    DB_FORMAT, DB_VERSION)
        return {"format": DB_FORMAT, "version": DB_VERSION, "targets": {}}
    return db


def _fused_convs(mod: tvm.IRModule, target: tvm.target.Target,
                 kernel: DotKernel) -> dict[str, tvm.tirx.PrimFunc]:
    """key -> one fused conv PrimFunc of each shape, as the build pipeline produces them."""
    legalize = legalize_passes(target)
    with target:
        mod, _ = rewrite_convs_dot(mod, kernel)
        mod = tvm.transform.Sequential(legalize)(mod)
    out: dict = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            key = conv_key(fresh_schedule(func))
            log.debug("%s: conv key %s", gv.name_hint, key)
            if key is not None and key not in out:
                out[key] = func
    return out


def _random_args(func: tvm.tirx.PrimFunc, batch: int, dev: tvm.runtime.Device) -> list:
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:
        shape = [batch if not isinstance(d, tvm.tirx.IntImm) else int(d) for d in p.ty.shape]
        dtype = str(p.ty.dtype)
        if dtype.startswith(("int", "uint")):
            a = rng.integers(0, 100, shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(a, dev))
    return args


class Device:
    """Where candidates are timed: this machine (remote None) or a board over TVM RPC (cross-compiled
    uploads)."""

    def __init__(self, remote=None, target: CompileTarget | None = None, label: str = "local") -> None:
        self.remote, self.target, self.label = remote, target, label
        self._dir = tempfile.TemporaryDirectory(prefix="plateau-tune-") if remote is not None else None

    def load(self, lib: tvm.runtime.Executable) -> tuple[tvm.runtime.Module, tvm.runtime.Device]:
        if self.remote is None:
            return lib.mod, tvm.cpu()
        name = f"tile-{uuid.uuid4().hex[:12]}.so"
        path = Path(self._dir.name) / name
        self.target.export_library(lib, path)
        self.remote.upload(str(path), target=name)
        return self.remote.load_module(name), self.remote.cpu(0)


def _tile_timer(func: tvm.tirx.PrimFunc, tile: ConvTile, target: tvm.target.Target, batch: int,
                kernel: DotKernel, device: Device | None = None):
    """Build `func` with `tile`; a zero-argument callable giving one timing (seconds, min over repeats)."""
    sch = fresh_schedule(func, "main")
    sch = schedule_dot_conv(sch, find_conv_block(sch), tile, kernel)
    lib = tvm.compile(sch.mod, target)
    mod, dev = (device or Device()).load(lib)
    args = _random_args(func, batch, dev)
    timer = mod.time_evaluator("main", dev, number=3, repeat=5, min_repeat_ms=10)
    return lambda: float(min(timer(*args).results))


def tune_tiles(mod: tvm.IRModule, target: tvm.target.Target, kernel: DotKernel, minutes: float,
               batch: int = TUNE_BATCH, known: dict | None = None,
               device: Device | None = None) -> dict[str, dict]:
    """Search the conv tiles of `mod` (a lowered Relax module) on `kernel` (the target's:
    CompileTarget.kernel) within `minutes`; key -> {ow, oc, ms, default_ms}. Keys already in `known` are
    skipped. Timed on `device` (default: this machine)."""
    deadline = time.monotonic() + minutes * 60
    found: dict[str, dict] = {}
    for key, func in _fused_convs(mod, target, kernel).items():
        if known and key in known:
            continue
        sch = fresh_schedule(func)
        k = kernel_of(sch, find_conv_block(sch), kernel)
        ow_ext, ocb = conv_extents(sch, find_conv_block(sch), k)
        default = default_tile(ow_ext, ocb, k)
        timers: dict = {}
        for tile in [default] + [t for t in candidate_tiles(ow_ext, ocb, k) if t != default]:
            if time.monotonic() > deadline:
                break
            try:
                timers[tile] = _tile_timer(func, tile, target, batch, k, device)
            except Exception as e:  # noqa: BLE001 (a tile TVM cannot build is just not a candidate)
                log.info("tile %s of %s failed: %s", tile, key, str(e).splitlines()[0] if str(e) else e)
        # interleaved rounds, minimum per candidate: other processes disturb all candidates alike
        timings: dict[ConvTile, float] = {}
        for _ in range(ROUNDS):
            for tile, timer in timers.items():
                timings[tile] = min(timings.get(tile, float("inf")), timer())
        if not timings:
            break
        best = min(timings, key=timings.__getitem__)
        found[key] = {"ow": best.ow, "oc": best.oc, "kw_inner": best.kw_inner, "ms": timings[best] * 1e3,
                      "default_ms": timings.get(default, float("nan")) * 1e3, "tried": len(timings)}
        log.info("tuned %s: %s %.3f ms (default %s)", key, best, timings[best] * 1e3, default)
    return found


def _tuning_device(target: CompileTarget, rpc: str | None, rpc_key: str) -> Device:
    """This machine for the host target; a board over RPC otherwise (the timings must come from the
    device)."""
    if rpc is None:
        if target.arch != "host":
            raise PlateauError(f"tuning for target {target.name!r} needs the board: pass --rpc HOST:PORT of "
                               "`plateau device serve` running there (timings on this machine would tune for "
                               "it)")
        return Device()
    remote, info = rpc_connect(rpc, rpc_key)
    want = "aarch64" if target.arch == "aarch64" else None
    if want and info.get("machine") and info["machine"] != want:
        raise PlateauError(f"target {target.name!r} is {want}; the RPC server {rpc} is {info['machine']}")
    label = f"rpc {rpc}" + (" (emulated: timings are not the board's)" if info.get("emulated") else "")
    return Device(remote, target, label)


def tuned_tiles(mod: tvm.IRModule, target: CompileTarget, db_dir: Path, minutes: float = 0.0,
                rpc: str | None = None, rpc_key: str = "") -> tuple[TileChooser | None, dict | None]:
    """(tile chooser for build(), manifest summary) from the database in `db_dir`, tuning first when
    `minutes` > 0 (on this machine, or on the board at `rpc`). Without a database or tuning: (None, None),
    the default tiles."""
    if target.kernel is None:
        return None, None
    t = tvm.target.Target(target.tvm_target)
    path = Path(db_dir) / DB_FILE
    db = load_db(path)
    tkey = _target_key(t)
    entries = db["targets"].setdefault(tkey, {})
    searched = 0.0
    where = None
    if minutes > 0:
        device = _tuning_device(target, rpc, rpc_key)
        where = device.label
        start = time.monotonic()
        new = tune_tiles(mod, t, target.kernel, minutes, known=entries, device=device)
        searched = time.monotonic() - start
        if new:
            entries.update(new)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(db, indent=1, sort_keys=True))
    if not entries:
        return None, None

    def choose(_name: str, sch: Schedule) -> ConvTile | None:
        e = entries.get(conv_key(sch) or "")
        return ConvTile(e["ow"], e["oc"], e.get("kw_inner", False)) if e else None

    info = {"database": str(path), "entries": len(entries), "search_seconds": round(searched, 1),
            "timed_on": where}
    return choose, info
