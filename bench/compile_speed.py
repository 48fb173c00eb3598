"""Issue 7: TVM int8 (hand schedules, tuned tiles) against onnxruntime on the same CPU, side by side in one run.

    .venv/bin/python bench/compile_speed.py --run runs/perf --data /work/shared/data/cifar10 --tune-minutes 10

Needs <run>/export/model_qdq.onnx and model_fp32.onnx (plateau export). Engines, each in a process of its own (so
one engine's idle threads do not compete with the timed one), timed one at a time in interleaved rounds (each round
times every engine once per batch size; the figure is the median over rounds):

    tvm-int8-untuned   plateau compile with schedule="none" (TVM's default CPU pipeline)
    tvm-int8           plateau compile with the hand schedules and the tuned-tile database (tuned first if absent)
    ort-fp32           onnxruntime on model_fp32.onnx
    ort-qop-u8s8       quantize_static QOperator, U8 activations, S8 per-channel weights, min-max
    ort-qdq-u8s8       quantize_static QDQ, same settings
    ort-plateau-qdq    onnxruntime on the QDQ file TVM compiles (Plateau's export)

Also: tuning time, a second build from the database, tvm-int8 == tvm-int8-untuned on real test images
(np.array_equal), and the int8 MAC rate at the large batch as a fraction of the CPU's VNNI peak
(cores x 64 MACs/cycle: one 512-bit vpdpbusd per cycle, x the clock measured under load by measured_clock_ghz;
/proc/cpuinfo gives the nominal clock, below the boost the cores run at).
Writes bench/results/compile_speed.json and prints the markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["main", "conv_macs"]


def conv_macs(fp32_onnx: Path) -> int:
    """Multiply-accumulates of one image through every Conv / Gemm / MatMul of the float model (matmuls of two
    activations, attention's, included)."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(fp32_onnx))
    inp = m.graph.input[0]
    for d in inp.type.tensor_type.shape.dim[:1]:
        d.ClearField("dim_param")
        d.dim_value = 1
    m = shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = inits[n.input[1]]
            out = shapes[n.output[0]]
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):  # B a weight or an activation (attention), shaped by inference
            w = inits.get(n.input[1]) or shapes.get(n.input[1])
            out = shapes.get(n.output[0])
            if out and not out[0]:  # a batch the shape inference could not carry (Shape -> Reshape): one image
                out = [1, *out[1:]]
            if not w or not out or len(w) < 2 or 0 in w[-2:] or 0 in out:
                raise ValueError(f"{fp32_onnx}: cannot infer the shapes of {n.op_type} node {n.name!r}")
            total += int(np.prod(out)) * (w[-2] if n.op_type == "MatMul" or not _trans_b(n) else w[-1])
    return total


def _trans_b(node) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _cpu() -> tuple[str, float]:
    name, mhz = platform.processor() or "?", 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("?", ""):
                name = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":", 1)[1]))
    except OSError:
        pass
    return name, mhz


def measured_clock_ghz(iterations: int = 200_000_000) -> float:
    """The core clock while busy, which boosts above /proc/cpuinfo's nominal figure: a chain of dependent
    64-bit multiplies (3 cycles each on current x86 cores), compiled by TVM and timed (best of 5)."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def chain(out: T.Buffer((1,), "int64"), n: T.int64) -> None:
        T.func_attr({"global_symbol": "main"})
        x = T.alloc_local((1,), "int64")
        x[0] = out[0] + 3
        for _ in range(n):
            x[0] = x[0] * x[0]
        out[0] = x[0]

    lib = tvm.compile(tvm.IRModule({"main": chain}), "llvm")
    timer = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=5)
    seconds = min(timer(tvm.runtime.tensor(np.zeros(1, np.int64)), iterations).results)
    return 3 * iterations / seconds / 1e9


def _images(data: str, n: int, mean: list, std: list, size: int | None = None) -> np.ndarray:
    from plateau.data import SYNTHETIC, load_split, normalize

    test = load_split(data, "test", size if data == SYNTHETIC else None)  # generated at the model's size
    return normalize(test.images[:n], mean, std).numpy().astype(np.float32)


# pause before timing each engine: the previous engine's worker threads spin on after its last call (onnxruntime's
# intra-op pool and TVM's both do) and would share the cores with the timed one; medians of onnxruntime at batch 1
# jumped between ~3.5 and ~7 ms without it
SETTLE_SECONDS = 0.2


class _Engine:
    """One engine in a process of its own, driven over a pipe. In one shared process the idle engine's thread pool
    competes with the timed one: after onnxruntime runs, its spinning worker threads made TVM's batch-1 calls up to
    2x slower for tens of milliseconds. A waiting engine's process blocks on the pipe instead."""

    def __init__(self, kind: str, path: Path, threads: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: the parent already runs TVM's thread pool
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kind, str(path), threads), daemon=True)
        self.proc.start()

    def _ask(self, *msg):
        self.conn.send(msg)
        reply = self.conn.recv()
        if isinstance(reply, str):
            raise RuntimeError(reply)
        return reply

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._ask("run", x)

    def time(self, x: np.ndarray, calls: int) -> float:
        """Seconds per call over `calls` back-to-back calls, after one warm-up call."""
        return self._ask("time", x, calls)

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(timeout=10)


def _serve(conn, kind: str, path: str, threads: int) -> None:
    """The engine process: load the model, then answer "run" (the outputs) and "time" (seconds per call)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)  # before TVM starts its thread pool
    try:
        fn = _tvm(Path(path)) if kind == "tvm" else _ort(Path(path), threads, int8_qdq=kind == "ort-int8-qdq")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.recv()
        conn.send(f"{path}: {type(e).__name__}: {e}")
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        prepared = fn(msg[1])  # uploads the input (outside the timed calls) and warms up
        if msg[0] == "run":
            conn.send(prepared())
            continue
        t0 = time.perf_counter()
        for _ in range(msg[2]):
            prepared()
        conn.send((time.perf_counter() - t0) / msg[2])


def _ort(path: Path, threads: int, int8_qdq: bool = False):
    import onnxruntime as ort

    from plateau.export.validate import ORT_INT8_QDQ

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # Plateau's own QDQ file: the session every check uses (signed int8 QDQ in integer kernels; without it x86
    # onnxruntime 1.32's S8->U8 rewrite fails on a ViT's uint8 probabilities)
    for key, value in (ORT_INT8_QDQ if int8_qdq else {}).items():
        so.add_session_config_entry(key, value)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name

    def prepare(x: np.ndarray):
        x = np.ascontiguousarray(x)
        s.run(None, {name: x})
        return lambda: s.run(None, {name: x})[0]

    return prepare


def _tvm(so: Path):
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    f = relax.VirtualMachine(tvm.runtime.load_module(str(so)), dev)["main"]

    def prepare(x: np.ndarray):
        t = tvm.runtime.tensor(np.ascontiguousarray(x), dev)  # uploaded once: the timed part is the model
        f(t)
        return lambda: f(t).numpy()

    return prepare


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/perf")
    p.add_argument("--data", default="/work/shared/data/cifar10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median over them)")
    p.add_argument("--seconds", type=float, default=0.5, help="time per engine, batch and round")
    p.add_argument("--tune-minutes", type=float, default=10.0, help="tile search budget when no database exists")
    p.add_argument("--retune", action="store_true", help="delete the tile database first")
    p.add_argument("--target", default="host", help="compile target of the TVM builds, run on this machine (e.g. "
                   "x86-avx2: the vpmaddwd kernel, for CPUs without AVX-512 VNNI)")
    p.add_argument("--fp32", help="FP32 ONNX instead of <run>/export/model_fp32.onnx")
    p.add_argument("--qdq", help="QDQ ONNX for TVM instead of <run>/export/model_qdq.onnx (e.g. onnxruntime's "
                   "quantize_static output: bench/vit_onnx.py)")
    p.add_argument("--allow-float", action="store_true", help="compile with float islands (LayerNorm, Softmax, "
                   "GELU of a transformer) kept in float")
    p.add_argument("--out", default="bench/results/compile_speed.json")
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    from plateau.compile import compile_onnx
    from plateau.ort_quantizer import ort_quantize

    run = Path(args.run)
    fp32 = Path(args.fp32) if args.fp32 else run / "export" / "model_fp32.onnx"
    qdq = Path(args.qdq) if args.qdq else run / "export" / "model_qdq.onnx"
    manifest = run / "export" / "manifest.json"
    man = json.loads(manifest.read_text()) if manifest.is_file() else {}  # no export: default normalization
    cfg = man.get("plateau_cfg", {})
    x_all = _images(args.data, max(args.batches) + 256, cfg.get("mean", [0.485, 0.456, 0.406]),
                    cfg.get("std", [0.229, 0.224, 0.225]), cfg.get("input_size", [3, 32, 32])[-1])
    eng_dir = run / "bench" / "compile_speed"
    eng_dir.mkdir(parents=True, exist_ok=True)

    # -- builds -------------------------------------------------------------------------------------------------
    out_untuned, out_tuned = run / "compile" / f"{args.target}-untuned", run / "compile" / args.target
    db = out_tuned / "tuning" / "tiles.json"
    if args.retune and db.exists():
        db.unlink()
    builds = {}
    t0 = time.perf_counter()
    compile_onnx(qdq, args.target, out_untuned, schedule="none", allow_float=args.allow_float)
    builds["untuned_build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = compile_onnx(qdq, args.target, out_tuned, tune_minutes=0.0 if db.exists() else args.tune_minutes,
                         allow_float=args.allow_float)
    builds["first_build_s"] = time.perf_counter() - t0
    builds["tuning_search_s"] = (first.get("tuning") or {}).get("search_seconds", 0.0)
    t0 = time.perf_counter()
    second = compile_onnx(qdq, args.target, out_tuned, allow_float=args.allow_float)  # reads the database
    builds["second_build_s"] = time.perf_counter() - t0
    builds["tuning"] = second.get("tuning")

    # -- onnxruntime variants (calibrated on 256 test images the timing does not use) -------------------------------
    calib = x_all[-256:]
    qop = eng_dir / "ort_qop_u8s8.onnx"
    qdq_ort = eng_dir / "ort_qdq_u8s8.onnx"
    if not qop.exists():
        ort_quantize(fp32, calib, qop, "qop", "u8", batch=32)
    if not qdq_ort.exists():
        ort_quantize(fp32, calib, qdq_ort, "qdq", "u8", batch=32)

    engines = {"tvm-int8": _Engine("tvm", out_tuned / "model.so", args.threads),
               "tvm-int8-untuned": _Engine("tvm", out_untuned / "model.so", args.threads),
               "ort-qop-u8s8": _Engine("ort", qop, args.threads), "ort-qdq-u8s8": _Engine("ort", qdq_ort, args.threads),
               "ort-plateau-qdq": _Engine("ort-int8-qdq", qdq, args.threads),  # the very file TVM compiled
               "ort-fp32": _Engine("ort", fp32, args.threads)}

    # -- exactness: the scheduled build against the untuned one ---------------------------------------------------
    exact = {}
    for b in args.batches:
        xb = x_all[:b]
        exact[b] = bool(np.array_equal(engines["tvm-int8"].run(xb), engines["tvm-int8-untuned"].run(xb)))

    # -- interleaved timing ------------------------------------------------------------------------------------
    samples: dict = {n: {b: [] for b in args.batches} for n in engines}
    for _ in range(args.rounds):
        for b in args.batches:
            xb = np.ascontiguousarray(x_all[:b])
            for name, e in engines.items():
                time.sleep(SETTLE_SECONDS)
                est = e.time(xb, 1)
                calls = max(1, min(200, int(args.seconds / max(est, 1e-6))))
                if name == "tvm-int8-untuned":
                    calls = 1  # ~10x slower: one call is enough to show it
                samples[name][b].append(e.time(xb, calls))
    for e in engines.values():
        e.close()
    res = {n: {b: {"median_ms": float(np.median(v)) * 1e3, "min_ms": float(np.min(v)) * 1e3,
                   "max_ms": float(np.max(v)) * 1e3} for b, v in d.items()} for n, d in samples.items()}

    try:
        macs, macs_note = conv_macs(fp32), None
    except ValueError as e:  # e.g. a transformer exported with a dynamic reshape: no MAC rate rather than a wrong one
        macs, macs_note = None, str(e)
    cpu, mhz = _cpu()
    cores = args.threads
    ghz = measured_clock_ghz()
    # MAC/s: one 512-bit vpdpbusd (64 MACs) per cycle and core; no peak is claimed for the other kernels
    vnni = first["kernel"] == "vnni"  # the dot kernel the compile manifest records
    peak = cores * 64 * ghz * 1e9 if vnni else None
    big = max(args.batches)
    t_big = res["tvm-int8"][big]["median_ms"] / 1e3
    rate = macs * big / t_big if macs else None
    ort_int8 = ("ort-qop-u8s8", "ort-qdq-u8s8", "ort-plateau-qdq")
    ort_best = {b: min(res[n][b]["median_ms"] for n in ort_int8) for b in args.batches}
    ort_best_min = {b: min(res[n][b]["min_ms"] for n in ort_int8) for b in args.batches}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "machine": {"cpu": cpu, "mhz": mhz, "measured_ghz": ghz, "threads": args.threads,
                    "load_avg": os.getloadavg()},
        "builds": builds, "exact_vs_untuned": exact, "macs_per_image": macs, "latency": res,
        "ratios": {b: {"tvm_over_best_ort_int8": res["tvm-int8"][b]["median_ms"] / ort_best[b],
                       "tvm_over_best_ort_int8_min": res["tvm-int8"][b]["min_ms"] / ort_best_min[b],
                       "ort_fp32_over_tvm_min": res["ort-fp32"][b]["min_ms"] / res["tvm-int8"][b]["min_ms"],
                       "ort_fp32_over_tvm": res["ort-fp32"][b]["median_ms"] / res["tvm-int8"][b]["median_ms"],
                       "untuned_over_tvm": res["tvm-int8-untuned"][b]["median_ms"] / res["tvm-int8"][b]["median_ms"]}
                   for b in args.batches},
        "target": args.target,
        "mac_rate": {"batch": big, "gmac_per_s": rate / 1e9 if rate else None,
                     "vnni_peak_gmac_per_s": peak / 1e9 if peak else None,
                     "fraction_of_peak": rate / peak if peak and rate else None, "note": macs_note},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(_markdown(report, args.batches))
    return report


def _markdown(r: dict, batches: list[int]) -> str:
    mc = r["machine"]
    lines = [f"- date: {r['date']}; machine: {mc['cpu']}, {mc['mhz']:.0f} MHz nominal, {mc['measured_ghz']:.2f} GHz "
             f"measured under load, {mc['threads']} threads; load average at the end {mc['load_avg']}",
             "", "| engine | " + " | ".join(f"batch {b} median (min-max) ms" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name, d in r["latency"].items():
        cells = [f"{d[b]['median_ms']:.3f} ({d[b]['min_ms']:.3f}-{d[b]['max_ms']:.3f})" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for b in batches:
        q = r["ratios"][b]
        lines.append(f"- batch {b}: tvm-int8 / fastest onnxruntime int8 = {q['tvm_over_best_ort_int8']:.2f}x "
                     f"(medians; {q['tvm_over_best_ort_int8_min']:.2f}x on minima); ort-fp32 / tvm-int8 = "
                     f"{q['ort_fp32_over_tvm']:.2f}x ({q['ort_fp32_over_tvm_min']:.2f}x on minima); untuned / tuned = "
                     f"{q['untuned_over_tvm']:.1f}x; bit-exact vs untuned: {r['exact_vs_untuned'][b]}")
    m = r["mac_rate"]
    if m["gmac_per_s"] is None:
        lines.append(f"- int8 MAC rate: not computed ({m['note']})")
    elif m["vnni_peak_gmac_per_s"]:
        lines.append(f"- int8 MAC rate at batch {m['batch']}: {m['gmac_per_s']:.1f} GMAC/s = "
                     f"{100 * m['fraction_of_peak']:.1f}% of the VNNI peak {m['vnni_peak_gmac_per_s']:.0f} GMAC/s "
                     f"({r['machine']['threads']} cores x 64 MAC/cycle x the measured clock) "
                     f"({r['macs_per_image'] / 1e6:.1f} M MAC per image)")
    else:
        lines.append(f"- int8 MAC rate at batch {m['batch']}: {m['gmac_per_s']:.1f} GMAC/s (target {r['target']}: "
                     f"not a VNNI kernel, no peak claimed) ({r['macs_per_image'] / 1e6:.1f} M MAC per image)")
    bd = r["builds"]
    lines.append(f"- builds: untuned {bd['untuned_build_s']:.0f} s; first scheduled build "
                 f"{bd['first_build_s']:.0f} s (tile search {bd['tuning_search_s']:.0f} s); second build from the "
                 f"database {bd['second_build_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
