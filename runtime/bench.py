"""`plateau bench`: latency, size, peak memory and top-1 of every engine, side by side in one run on one
device.

Engines (each in its own process, so its peak RSS is its own):
    tvm-<bits>       the run's artifact, <run>/compile/<target>/model.so
    tvm-W4A8 / W8A8  the other bit width: re-quantized from reference.pt with the export's settings, then
                     compiled
    tvm-fp32         model_fp32.onnx compiled for the target (float conv/matmul kept, allow_float)
    ort-fp32         onnxruntime on model_fp32.onnx                                   (local device only)
    ort-qdq, ort-qop onnxruntime.quantization.quantize_static of model_fp32.onnx, QDQ and QOperator formats,
                     u8 and s8 activations (s8 weights, per channel), calibrated on train images; the table
                     shows the faster of u8/s8 per format, the JSON both                   (local device only)

Latency: warm-up calls, then repeats until the running median is stable (or a cap), at batch 1 and --batch;
median, p90 and min. Everything is written to <run>/bench/<target>/ (report.md/.html/.json, PNGs); derived
models are cached in <run>/bench/<target>/engines/. Under qemu the times are emulation times and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from plateau.artifacts import read_manifest, sha256_file, verify_file, write_json
from plateau.config_cli import float_at_least, int_at_least
from plateau.data import batches, load_split
from plateau.errors import PlateauError
from plateau.export.validate import ort_u8s8_saturates
from plateau.ort_quantizer import ort_quantize
from plateau.staging import staged_output

from .run import DEVICES, artifact_device_api, run_artifact
from .validate import _test_set, check_artifact, pick_device, run_on_device

__all__ = ["add_arguments", "main", "ENGINES", "requantize_variant"]

ENGINES = ["tvm-int8", "tvm-int4", "tvm-fp32", "ort-fp32", "ort-qdq", "ort-qop"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host",
                   help="compiled target folder under <run>/compile (default host)")
    p.add_argument("--device", choices=DEVICES,
                   help="local (default for host builds), qemu (arm64 builds), rpc")
    p.add_argument("--rpc", help="HOST:PORT of a board running `plateau device serve` (implies --device rpc)")
    p.add_argument("--rpc-key", help="key the board's server was started with")
    p.add_argument("--threads", type=int_at_least(1), default=min(os.cpu_count() or 1, 4),
                   help="threads per engine (TVM_NUM_THREADS, onnxruntime intra-op); default min(cores, 4)")
    p.add_argument("--batch", type=int_at_least(1), default=64,
                   help="the larger batch size (batch 1 is always timed)")
    p.add_argument("--repeats", type=int_at_least(1), default=200, help="most timed calls per engine and batch")
    p.add_argument("--min-repeats", type=int_at_least(1), default=10)
    p.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed calls first")
    p.add_argument("--max-seconds", type=float_at_least(0.001), default=6.0,
                   help="time budget per engine and batch size")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {','.join(ENGINES)}")
    p.add_argument("--eval-limit", type=int_at_least(0), help="test images for each engine's top-1 (default 1000 "
                                                              "locally, 100 under qemu; 0: no accuracy)")
    p.add_argument("--calib-images", type=int_at_least(1), default=256,
                   help="train images calibrating onnxruntime's quantize_static (default 256)")


def _engines(arg: str) -> list[str]:
    names = [e.strip() for e in arg.split(",") if e.strip()]
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        raise PlateauError(f"--engines: unknown engine {bad[0] if bad else arg!r}; valid: {', '.join(ENGINES)}")
    return names


# --- derived models -----------------------------------------------------------------------------------------
def _cached(folder: Path, key: dict) -> bool:
    try:
        return json.loads((folder / "built.json").read_text()) == key
    except (OSError, json.JSONDecodeError):
        return False


def _mark(folder: Path, key: dict) -> None:
    write_json(folder / "built.json", key)


def requantize_variant(run: Path, exp: dict, bits: str, out_dir: Path) -> Path:
    """The run's FP model re-quantized at `bits` with the export's settings (nearest rounding):
    model_qdq.onnx."""
    import torch

    from plateau.export import QuantConfig, export_model
    from plateau.models import rebuild_model
    from plateau.quant import parse_bits

    ref_path = verify_file(run / "export", exp, "reference.pt", "export")
    key = {"reference_sha256": sha256_file(ref_path), "bits": bits}
    if _cached(out_dir, key):
        return out_dir / "model_qdq.onnx"
    st = torch.load(run / "export" / "reference.pt", map_location="cpu", weights_only=True)
    model = rebuild_model(st["model_name"], st["num_classes"], st["plateau_cfg"])
    model.load_state_dict(st["model"], strict=False)
    model.eval()
    c = exp["config"]
    w, a = parse_bits(bits)
    # the export's settings at the other bit width, rounded to nearest (learned rounding would take minutes)
    cfg = QuantConfig.from_dict(c, weight_bits=w, act_bits=a, rounding="nearest", learn_act_clip=False,
                                layer_bits={})
    train = load_split(c["data"], "train", c.get("img_size"))
    mean, std = st["plateau_cfg"]["mean"], st["plateau_cfg"]["std"]
    calib = [x for x, _ in batches(train, 128, mean, std, shuffle=True, seed=cfg.seed,
                                   limit=cfg.calib_images)]
    export_model(model, calib, cfg, out_dir, {"plateau.variant_of": str(run)})
    _mark(out_dir, key)
    return out_dir / "model_qdq.onnx"


def _compiled(onnx_path: Path, target: str, out_dir: Path, allow_float: bool = False) -> Path:
    from plateau.compile import compile_onnx

    key = {"onnx_sha256": sha256_file(onnx_path), "target": target, "allow_float": allow_float}
    if not (_cached(out_dir, key) and (out_dir / "model.so").is_file()):
        compile_onnx(onnx_path, target, out_dir, allow_float=allow_float)
        _mark(out_dir, key)
    return out_dir / "model.so"


# --- measuring ----------------------------------------------------------------------------------------------
def _worker_cmd(device: str) -> list[str]:
    if device == "qemu":
        from .sysroot import arm64_python

        return [*arm64_python(), str(Path(__file__).with_name("_bench_worker.py").resolve())]
    return [sys.executable, str(Path(__file__).with_name("_bench_worker.py").resolve())]


def _measure(kind: str, path: Path, device: str, args, x_lat: np.ndarray, x_eval: np.ndarray | None,
             tmp: Path, tag: str) -> tuple[dict, np.ndarray | None]:
    """Run one engine in a fresh process; its latency/memory dict and its eval-set logits."""
    np.save(tmp / "lat.npy", x_lat)
    emulated = device == "qemu"
    api = artifact_device_api(path) if kind == "tvm" else "cpu"
    spec = {"kind": kind, "path": str(path.resolve()), "device_api": api, "threads": args.threads,
            "inputs": str(tmp / "lat.npy"),
            "batches": sorted({1, args.batch}), "warmup": 1 if emulated else args.warmup,
            "min_repeats": 3 if emulated else args.min_repeats,
            "max_repeats": 5 if emulated else args.repeats,
            "max_seconds": args.max_seconds, "rel_tol": 0.02, "eval_inputs": None, "eval_outputs": None}
    if x_eval is not None and len(x_eval):
        np.save(tmp / "eval.npy", x_eval)
        spec.update(eval_inputs=str(tmp / "eval.npy"), eval_outputs=str(tmp / f"{tag}.out.npy"))
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([*_worker_cmd(device), str(tmp / "spec.json"), str(tmp / "res.json")],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        msg = next((ln[6:] for ln in lines if ln.startswith("ERROR ")), lines[-1] if lines else "")
        illegal = proc.returncode == -4
        sig = " (illegal instruction: the CPU lacks a feature the build uses)" if illegal else ""
        raise PlateauError(f"bench worker for {path} failed (exit {proc.returncode}){sig}: {msg}"[:400])
    res = json.loads((tmp / "res.json").read_text())
    out = np.load(tmp / f"{tag}.out.npy") if spec["eval_outputs"] else None
    return res, out


def _measure_rpc(lib: Path, comp: dict, target: str, args, x_lat: np.ndarray, x_eval: np.ndarray | None):
    # Over RPC the board's server times the calls (TVM time_evaluator, fixed repeats); memory is not visible.
    res = run_on_device(lib, x_lat[: args.batch], "rpc", comp, target, batch_size=args.batch, rpc=args.rpc,
                        rpc_key=args.rpc_key, timing=True)
    lat = {k: v for k, v in (res.latency or {}).items() if k.startswith("batch_")}
    out = None
    if x_eval is not None and len(x_eval):
        out = run_artifact(lib, x_eval, "rpc", batch_size=100, rpc=args.rpc, rpc_key=args.rpc_key).outputs
    return {"latency": lat, "peak_rss_mb": None, "model_rss_mb": None, "emulated": res.emulated}, out


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    t_start = time.time()
    engines = _engines(args.engines)
    if args.threads < 1 or args.batch < 1 or args.repeats < 1 or args.max_seconds <= 0:
        raise PlateauError("--threads, --batch and --repeats must be >= 1 and --max-seconds > 0")
    exp = read_manifest(run / "export", "export")
    comp_dir = run / "compile" / args.target
    comp = check_artifact(comp_dir, args.target, exp)
    lib = comp_dir / "model.so"
    device = pick_device(args.device, args.rpc, lib)
    emulated = device == "qemu"
    eval_n = args.eval_limit if args.eval_limit is not None else (100 if emulated else 1000)
    n_test = max(eval_n, args.batch)
    x_all, y_all = _test_set(exp, n_test)
    x_lat, x_eval, y_eval = x_all[: args.batch], x_all[:eval_n], y_all[:eval_n]
    # Probe the device with the run's artifact first: a board that cannot run it fails here, before any
    # building.
    run_on_device(lib, x_lat[:1], device, comp, args.target, batch_size=1, rpc=args.rpc, rpc_key=args.rpc_key)

    out_dir = run / "bench" / args.target
    # The report folder is replaced as a whole; the derived engines in it are carried over for reuse.
    with staged_output(out_dir, keep=("engines",)) as stage:
        report, doc = _bench_into(stage, args, run, exp, comp, lib, device, engines, x_lat, x_eval, y_eval, t_start)
    print(doc.markdown())
    print(f"bench: report in {out_dir}/report.md and report.html")
    return report


def _bench_into(stage: Path, args: argparse.Namespace, run: Path, exp: dict, comp: dict, lib: Path, device: str,
                engines: list[str], x_lat: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
                t_start: float):
    """Build the derived engines, time every engine and write the report into `stage` (the staging folder);
    (the report, its document)."""
    emulated = device == "qemu"
    bits = exp["config"].get("bits", "W8A8")
    other_bits = "W4A8" if bits != "W4A8" else "W8A8"
    eng_dir = stage / "engines"
    plan: list[dict] = []  # engine, kind, path, bits, format
    if "tvm-int8" in engines:
        plan.append({"engine": f"TVM {bits}", "kind": "tvm", "path": lib, "bits": bits, "runtime": "TVM"})
    if "tvm-int4" in engines:
        print(f"bench: building the {other_bits} variant (re-quantize, compile for {args.target})",
              flush=True)
        q = requantize_variant(run, exp, other_bits, eng_dir / other_bits)
        plan.append({"engine": f"TVM {other_bits}", "kind": "tvm", "bits": other_bits, "runtime": "TVM",
                     "path": _compiled(q, args.target, eng_dir / other_bits / "compile")})
    fp32 = run / "export" / "model_fp32.onnx"
    if "tvm-fp32" in engines:
        print(f"bench: compiling model_fp32.onnx for {args.target}", flush=True)
        plan.append({"engine": "TVM fp32", "kind": "tvm", "bits": "fp32", "runtime": "TVM",
                     "path": _compiled(fp32, args.target, eng_dir / "fp32", allow_float=True)})
    skipped = []
    ort_engines = [e for e in engines if e.startswith("ort-")]
    if ort_engines and device != "local":
        skipped.append(f"onnxruntime engines ({', '.join(ort_engines)}): onnxruntime runs only on this "
                       f"machine, not on the {device} device")
        ort_engines = []
    if "ort-fp32" in ort_engines:
        plan.append({"engine": "ORT fp32", "kind": "ort", "path": fp32, "bits": "fp32",
                     "runtime": "onnxruntime"})
    if {"ort-qdq", "ort-qop"} & set(ort_engines):
        key = {"fp32_sha256": sha256_file(fp32), "calib_images": args.calib_images}
        c = exp["config"]
        todo = [(f, a) for f in ("qdq", "qop") if f"ort-{f}" in ort_engines for a in ("u8", "s8")]
        if not _cached(eng_dir / "ort", key) or not all((eng_dir / "ort" / f"{f}_{a}.onnx").is_file()
                                                          for f, a in todo):
            print(f"bench: onnxruntime quantize_static on {args.calib_images} train images", flush=True)
            train = load_split(c["data"], "train", c.get("img_size"))
            cfg = exp["plateau_cfg"]
            calib = np.concatenate([xb.numpy() for xb, _ in batches(train, 256, cfg["mean"], cfg["std"],
                                                                    shuffle=True, seed=0,
                                                                    limit=args.calib_images)])
            for f, a in todo:
                ort_quantize(fp32, calib, eng_dir / "ort" / f"{f}_{a}.onnx", f, a)
            _mark(eng_dir / "ort", key)
        for f, a in todo:
            plan.append({"engine": f"ORT int8 {f.upper()} {a}s8", "kind": "ort", "bits": "W8A8", "format": f,
                         "act": a, "runtime": "onnxruntime", "path": eng_dir / "ort" / f"{f}_{a}.onnx"})

    rows: list[dict] = []
    failed: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="plateau-bench-") as tmp:
        for i, e in enumerate(plan):
            print(f"bench: {e['engine']} ({device}{', emulated' if emulated else ''})", flush=True)
            try:
                if device == "rpc":
                    own = comp if e["path"] == lib else {}
                    r, out = _measure_rpc(Path(e["path"]), own, args.target, args, x_lat, x_eval)
                else:
                    r, out = _measure(e["kind"], Path(e["path"]), device, args, x_lat, x_eval, Path(tmp),
                                      f"e{i}")
            except PlateauError as err:
                if e["path"] == lib:
                    raise  # the run's own artifact must work; a derived engine may fail and is reported
                failed.append({**{k: str(v) for k, v in e.items()}, "error": str(err)})
                print(f"bench: {e['engine']} failed: {err}", flush=True)
                continue
            row = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in e.items()}, **r,
                   "bytes": Path(e["path"]).stat().st_size,
                   "top1": float((out.argmax(1) == y_eval).mean()) if out is not None else None}
            rows.append(row)
    rows = _best_of_u8_s8(rows)
    report = {
        "run": str(run), "target": args.target, "device": device, "emulated": emulated,
        "machine": _machine(device, artifact_device_api(lib)), "model": exp.get("model"), "bits": bits,
        "threads": args.threads,
        "batches": sorted({1, args.batch}), "eval_images": int(len(y_eval)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"warmup": args.warmup, "min_repeats": args.min_repeats, "max_repeats": args.repeats,
                     "max_seconds": args.max_seconds, "stability": "running median within 2% between checks"},
        "engines": rows, "failed": failed, "skipped": skipped, "seconds": round(time.time() - t_start, 1),
        "note": ("EMULATED with qemu-aarch64: times and memory are the emulator's, not a board's" if emulated
                 else "one run, engines one after another on the same machine; shared machines make times "
                 "noisy"),
        "onnxruntime_int8_note": ort_int8_note(device, rows),
    }
    doc = render_document(report)
    doc.write(stage, data=report)
    return report, doc


def ort_int8_note(device: str, rows: list[dict]) -> str | None:
    """What the report says beside onnxruntime's int8 engines on an x86-64 CPU without VNNI, where its U8S8 kernels
    (every default x86 session runs int8 QDQ as U8S8) add product pairs in saturating int16: their times are of
    that inexact arithmetic. None elsewhere, or when no onnxruntime int8 engine ran."""
    int8 = [r for r in rows if r.get("runtime") == "onnxruntime" and r.get("bits") != "fp32"]
    if device != "local" or not int8 or not ort_u8s8_saturates():
        return None
    return ("this CPU is x86-64 without VNNI: onnxruntime's int8 kernels here (U8S8, vpmaddubsw) add pairs of "
            "products in int16, which saturates with 8-bit weights, so their times are of inexact arithmetic and "
            "their top-1 can differ from the reference's; Plateau's AVX2 kernels widen to int16 first and stay exact")


def _best_of_u8_s8(rows: list[dict]) -> list[dict]:
    """Mark the faster (batch-B median) of the u8 and s8 variants of each onnxruntime int8 format as shown."""
    for fmt in ("qdq", "qop"):
        group = [r for r in rows if r.get("format") == fmt]
        if not group:
            continue
        b = max(int(k.split("_")[1]) for k in group[0]["latency"])
        best = min(group, key=lambda r: r["latency"][f"batch_{b}"]["median_ms"])
        for r in group:
            r["shown"] = r is best
    return rows


def _machine(device: str, api: str = "cpu") -> str:
    if device == "qemu":
        return "aarch64 under qemu-aarch64 on " + platform.machine()
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    gpu = ""
    if api != "cpu" and device == "local":
        import tvm

        gpu = f" + {tvm.cuda(0).device_name if api == 'cuda' else tvm.opencl(0).device_name}"
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores{gpu}".strip()


def render_document(r: dict):
    from .report import Document, accuracy_plot, latency_plot, ms, pct

    emu = " (EMULATED: qemu-aarch64)" if r["emulated"] else ""
    doc = Document(f"Benchmark: {r['model']} on {r['target']}, device {r['device']}{emu}")
    if r["emulated"]:
        doc.warning("Emulated with qemu-aarch64: these times and memory figures are the emulator's and say "
                    "nothing about speed on a board.")
    doc.text(f"{r['machine']}; {r['threads']} threads per engine; {r['date']}. {r['note']}.")
    if r.get("onnxruntime_int8_note"):
        doc.warning(r["onnxruntime_int8_note"][0].upper() + r["onnxruntime_int8_note"][1:] + ".")
    st = r["settings"]
    doc.text(f"Latency per call: {st['warmup']} warm-up calls, then repeats until the running median "
             f"is stable within 2% (at least {st['min_repeats']}, at most {st['max_repeats']} "
             f"calls or {st['max_seconds']} s). Peak memory: the engine's process high-water RSS "
             "(VmHWM); model = peak minus RSS before the engine library was imported and loaded. top-1 on "
             f"the first {r['eval_images']} test images.")
    shown = [e for e in r["engines"] if e.get("shown", True)]
    bs = r["batches"]
    header = ["engine", "bits"] + [f"b{b} {s} ms" for b in bs for s in ("median", "p90", "min")] + \
             ["stable", "size MB", "peak RSS MB", "model MB", "top-1"]
    rows = []
    for e in shown:
        lat = [e["latency"].get(f"batch_{b}", {}) for b in bs]
        cells = [ms(s.get(k)) for s in lat for k in ("median_ms", "p90_ms", "min_ms")]
        stable = "/".join("yes" if s.get("stable") else ("n/a" if "stable" not in s else "no") for s in lat)
        rows.append([e["engine"], e["bits"], *cells, stable, f"{e['bytes'] / 1e6:.2f}",
                     "n/a" if e.get("peak_rss_mb") is None else f"{e['peak_rss_mb']:.0f}",
                     "n/a" if e.get("model_rss_mb") is None else f"{e['model_rss_mb']:.0f}",
                     pct(e.get("top1"))])
    doc.heading("Latency, size, memory, accuracy")
    doc.table(header, rows)
    hidden = [e for e in r["engines"] if e.get("shown") is False]
    if hidden:
        doc.text("Not shown (the slower of u8/s8 activations): " + "; ".join(
            f"{e['engine']} b{bs[-1]} median {ms(e['latency'][f'batch_{bs[-1]}']['median_ms'])} ms, "
            f"top-1 {pct(e.get('top1'))}" for e in hidden) + ".")
    for s in r.get("skipped", []):
        doc.text(f"Skipped: {s}.")
    for f in r.get("failed", []):
        doc.text(f"Failed: {f['engine']}: {f['error']}")
    doc.figure("latency", latency_plot(shown, bs, "latency" + (" (EMULATED)" if r["emulated"] else "")),
               "latency per call")
    groups: dict[str, dict[str, float]] = {}
    for e in r["engines"]:
        if e.get("top1") is not None and e.get("shown", True):
            groups.setdefault(e["bits"], {})[e["runtime"]] = e["top1"]
    if groups:
        order = sorted(groups, key=lambda b: (b != "fp32",
                                              -int(b[1]) if b[:1] == "W" and b[1:2].isdigit() else 0))
        doc.figure("accuracy", accuracy_plot({k: groups[k] for k in order},
                                             f"top-1 per bit width ({r['eval_images']} test images)"),
                   "accuracy per bit width")
    return doc
