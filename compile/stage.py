"""`plateau compile`: <run>/export/model_qdq.onnx (or --onnx FILE from any tool) -> <run>/compile/<target>/.

The export's QDQ file is compiled only if its sha256 is the one the export manifest recorded (a file swapped or
damaged after export would otherwise replace a good library). The compile folder is replaced as a whole
(plateau.staging): a failed or killed build leaves the previous library and manifest as they were; the tuning
database in it is carried over.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plateau.artifacts import read_manifest, sha256_file
from plateau.config_cli import float_at_least
from plateau.errors import PlateauError
from plateau.staging import staged_output

from ._common import REQUANT_MODES
from .compiler import compile_onnx
from .targets import get_target, list_targets

__all__ = ["add_arguments", "main", "export_qdq"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host", help=f"one of: {', '.join(list_targets())} (default host)")
    p.add_argument("--onnx", help="compile this QDQ ONNX file (e.g. onnxruntime's quantize_static output) "
                                  "instead of the run's export")
    p.add_argument("--allow-float", action="store_true",
                   help="leave ops that cannot be lowered in float, listed in the manifest, instead of "
                        "failing")
    p.add_argument("--requant", default="float", choices=REQUANT_MODES,
                   help="requantization: float (float32 multiplier, as onnxruntime's fused kernels), float64 "
                        "(the exact product) or fixed (integer multiplier and shift)")
    p.add_argument("--schedule", default="default", choices=["default", "none"],
                   help="default: the target's dot-product kernel and the hand-written CPU schedules; "
                        "none: TVM's unscheduled kernels")
    p.add_argument("--tune-minutes", type=float_at_least(0.0), default=0.0,
                   help="search conv tiles for up to this long, timed on this machine (host) or on the "
                        "board at --rpc (arm64 targets); the answers are kept in "
                        "<run>/compile/<target>/tuning/tiles.json and reused by later builds")
    p.add_argument("--rpc",
                   help="HOST:PORT of a board running `plateau device serve`, where --tune-minutes times")
    p.add_argument("--rpc-key", default="", help="key the board's server was started with")


def export_qdq(run: Path) -> Path:
    """The run's exported QDQ file, checked against the export manifest: a file whose sha256 is not the recorded
    one is refused (one line naming both files), never compiled."""
    folder = run / "export"
    man = read_manifest(folder, "export")
    name = man["outputs"]["model_qdq.onnx"]
    path = folder / name
    if not path.is_file():
        raise PlateauError(f"{path}: missing, but {folder / 'manifest.json'} lists it; run `plateau export` again")
    want = man.get("qdq_sha256") or ((man.get("files") or {}).get(name) or {}).get("sha256")
    got = sha256_file(path)
    if want and got != want:
        raise PlateauError(f"{path} (sha256 {got[:12]}) is not the file {folder / 'manifest.json'} records "
                           f"(sha256 {str(want)[:12]}): the export was changed or interrupted; run `plateau export` "
                           "again (the compiled library was left as it was)")
    return path


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    get_target(args.target)  # an unknown target is refused before anything is read or locked
    onnx_path = Path(args.onnx) if args.onnx else export_qdq(run)
    out = run / "compile" / args.target
    with staged_output(out, keep=("tuning",)) as stage:
        manifest = compile_onnx(onnx_path, args.target, stage, allow_float=args.allow_float, requant=args.requant,
                                schedule=args.schedule, tune_minutes=args.tune_minutes, tune_rpc=args.rpc,
                                tune_rpc_key=args.rpc_key)
    ops = manifest.get("ops", {})
    print(f"compile: {onnx_path} -> {out / 'model.so'} for {args.target}; ops {ops}; "
          f"float islands: {manifest.get('float_islands') or 'none'}")
    return manifest
