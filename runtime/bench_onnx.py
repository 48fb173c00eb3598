"""`plateau bench` (this module is its entry point) and `plateau bench --onnx FILE`: the library compiled from a QDQ
file Plateau did not export, timed beside onnxruntime on the same file, each engine in its own process (the engines
and the report of `plateau bench`).

    plateau compile --onnx vit_qdq.onnx --run runs/ext --allow-float
    plateau bench --onnx vit_qdq.onnx --run runs/ext --data ../shared/data/cifar10 --mean 0.5 0.5 0.5 \\
        --std 0.5 0.5 0.5 [--fp32 vit_fp32.onnx]

Engines: TVM (the compiled library), onnxruntime on FILE (its QDQ int8 kernels), and with --fp32 the FP32 model
the file was quantized from: onnxruntime FP32 and onnxruntime's quantize_static QOperator (u8 and s8 activations,
calibrated on --calib-images train images of --data), onnxruntime's fastest int8 form.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from plateau.artifacts import sha256_file
from plateau.data import batches, load_split
from plateau.errors import PlateauError
from plateau.models import IMAGENET_MEAN, IMAGENET_STD
from plateau.ort_quantizer import ort_quantize
from plateau.staging import staged_output

from . import bench
from .validate_onnx import input_size, onnx_options

__all__ = ["add_arguments", "main", "bench_foreign"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`plateau bench`'s options, and --onnx with what it needs."""
    bench.add_arguments(p)
    onnx_options(p, "time the library compiled from this QDQ file (`plateau compile --onnx FILE`), one Plateau did "
                    "not export, beside onnxruntime on the same file; needs --data")
    p.add_argument("--fp32", help="with --onnx: the FP32 model the file was quantized from (adds onnxruntime FP32 "
                                  "and its quantize_static QOperator engines)")


def main(args: argparse.Namespace) -> dict:
    """`plateau bench`: a run's artifact (bench.py), or with --onnx one compiled from a file Plateau did not export."""
    return bench_foreign(args) if getattr(args, "onnx", None) else bench.main(args)


def bench_foreign(args: argparse.Namespace) -> dict:
    from .bench import _best_of_u8_s8, _machine, _measure, ort_int8_note, render_document
    from .validate import check_artifact, onnx_record

    path, run, t_start = Path(args.onnx), Path(args.run), time.time()
    if not path.is_file():
        raise PlateauError(f"--onnx {path}: no such file")
    if not args.data:
        raise PlateauError("--onnx needs --data: the ImageFolder tree (or 'synthetic') whose images to time on")
    fp32 = Path(args.fp32) if args.fp32 else None
    if fp32 is not None and not fp32.is_file():
        raise PlateauError(f"--fp32 {fp32}: no such file")
    comp_dir = run / "compile" / args.target
    comp = check_artifact(comp_dir, args.target, None)
    if onnx_record(comp).get("sha256") != sha256_file(path):
        raise PlateauError(f"{comp_dir / 'model.so'} was not compiled from {path}: run `plateau compile --onnx "
                           f"{path} --run {run} --target {args.target}` first")
    if args.device not in (None, "local"):
        raise PlateauError("--onnx benchmarks on this machine only (onnxruntime runs here): --device local")
    try:
        size = input_size(onnx.load(str(path), load_external_data=False), path)
    except PlateauError:
        raise
    except Exception as e:
        raise PlateauError(f"--onnx {path}: not a readable ONNX model ({type(e).__name__})") from None
    mean, std = list(args.mean or IMAGENET_MEAN), list(args.std or IMAGENET_STD)
    test = load_split(args.data, "test", size[-1])
    eval_n = 1000 if args.eval_limit is None else args.eval_limit
    n = max(eval_n, args.batch)
    x_all, y_all = zip(*((xb.numpy(), yb.numpy()) for xb, yb in batches(test, 250, mean, std, limit=n)),
                       strict=True)
    x_all, y_all = np.concatenate(x_all), np.concatenate(y_all)
    x_lat, x_eval, y_eval = x_all[: args.batch], x_all[:eval_n], y_all[:eval_n]

    out_dir = run / "bench" / args.target
    with staged_output(out_dir) as stage:
        (stage / "engines").mkdir(exist_ok=True)
        plan = [{"engine": "TVM (compiled from the file)", "kind": "tvm", "path": comp_dir / "model.so",
                 "bits": "QDQ", "runtime": "TVM"},
                {"engine": "ORT int8 on the file", "kind": "ort", "path": path, "bits": "QDQ",
                 "runtime": "onnxruntime"}]
        if fp32 is not None:
            train = load_split(args.data, "train", size[-1])
            calib = np.concatenate([xb.numpy() for xb, _ in batches(train, 256, mean, std, shuffle=True, seed=0,
                                                                    limit=args.calib_images)])
            plan.append({"engine": "ORT fp32", "kind": "ort", "path": fp32, "bits": "fp32",
                         "runtime": "onnxruntime"})
            for a in ("u8", "s8"):
                print(f"bench: onnxruntime quantize_static QOperator {a}s8 of {fp32}", flush=True)
                q = ort_quantize(fp32, calib, stage / "engines" / f"qop_{a}.onnx", "qop", a)
                plan.append({"engine": f"ORT int8 QOP {a}s8", "kind": "ort", "bits": "W8A8", "format": "qop",
                             "act": a, "runtime": "onnxruntime", "path": q})
        rows, failed = [], []
        with tempfile.TemporaryDirectory(prefix="plateau-bench-") as tmp:
            for i, e in enumerate(plan):
                print(f"bench: {e['engine']}", flush=True)
                try:
                    r, out = _measure(e["kind"], Path(e["path"]), "local", args, x_lat, x_eval, Path(tmp), f"e{i}")
                except PlateauError as err:
                    if i == 0:
                        raise
                    failed.append({"engine": e["engine"], "error": str(err)})
                    continue
                rows.append({**{k: (str(v) if isinstance(v, Path) else v) for k, v in e.items()}, **r,
                             "bytes": Path(e["path"]).stat().st_size,
                             "top1": float((out.argmax(1) == y_eval).mean()) if out is not None else None})
        rows = _best_of_u8_s8(rows)
        report = {
            "run": str(run), "target": args.target, "device": "local", "emulated": False, "machine": _machine("local"),
            "model": path.stem, "bits": "QDQ", "onnx": str(path), "fp32": str(fp32) if fp32 else None,
            "threads": args.threads, "batches": sorted({1, args.batch}), "eval_images": int(len(y_eval)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {"warmup": args.warmup, "min_repeats": args.min_repeats, "max_repeats": args.repeats,
                         "max_seconds": args.max_seconds, "stability": "running median within 2% between checks"},
            "float_islands": comp.get("float_islands"), "engines": rows, "failed": failed, "skipped": [],
            "seconds": round(time.time() - t_start, 1),
            "note": f"a file Plateau did not export ({path}); engines one after another on the same machine",
            "onnxruntime_int8_note": ort_int8_note("local", rows),
        }
        doc = render_document(report)
        doc.write(stage, data=report)
    print(doc.markdown())
    print(f"bench: report in {out_dir}/report.md and report.html")
    return report
