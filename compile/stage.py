"""`plateau compile`: <run>/export/model_qdq.onnx (or --onnx FILE from any tool) -> <run>/compile/<target>/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plateau.artifacts import read_manifest

from .compiler import compile_onnx
from .targets import list_targets

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host", help=f"one of: {', '.join(list_targets())} (default host)")
    p.add_argument("--onnx", help="compile this QDQ ONNX file (e.g. onnxruntime's quantize_static output) "
                                  "instead of the run's export")
    p.add_argument("--allow-float", action="store_true",
                   help="leave ops that cannot be lowered in float, listed in the manifest, instead of "
                        "failing")
    p.add_argument("--requant", default="float",
                   help="requantization: float (float32 multiplier, as onnxruntime's fused kernels), float64 "
                        "(the exact product) or fixed (integer multiplier and shift)")
    p.add_argument("--schedule", default="default", choices=["default", "none"],
                   help="default: the target's dot-product kernel and the hand-written CPU schedules; "
                        "none: TVM's unscheduled kernels")
    p.add_argument("--tune-minutes", type=float, default=0.0,
                   help="search conv tiles for up to this long, timed on this machine (host) or on the "
                        "board at --rpc (arm64 targets); the answers are kept in "
                        "<run>/compile/<target>/tuning/tiles.json and reused by later builds")
    p.add_argument("--rpc",
                   help="HOST:PORT of a board running `plateau device serve`, where --tune-minutes times")
    p.add_argument("--rpc-key", default="", help="key the board's server was started with")


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    if args.onnx:
        onnx_path = Path(args.onnx)
    else:
        man = read_manifest(run / "export", "export")
        onnx_path = run / "export" / man["outputs"]["model_qdq.onnx"]
    out = run / "compile" / args.target
    manifest = compile_onnx(onnx_path, args.target, out, allow_float=args.allow_float, requant=args.requant,
                            schedule=args.schedule, tune_minutes=args.tune_minutes, tune_rpc=args.rpc,
                            tune_rpc_key=args.rpc_key)
    ops = manifest.get("ops", {})
    print(f"compile: {onnx_path} -> {out / 'model.so'} for {args.target}; ops {ops}; "
          f"float islands: {manifest.get('float_islands') or 'none'}")
    return manifest
