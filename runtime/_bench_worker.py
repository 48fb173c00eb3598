"""One engine in its own process: load it, time it until stable, report peak memory, maybe run an eval set.

A script as well as a module: the arm64 Python under qemu runs it too, so it imports only numpy, tvm and
onnxruntime (no plateau). The spec and the result are JSON files:

    python _bench_worker.py spec.json result.json

spec: {"kind": "tvm"|"ort", "path": model.so|model.onnx,
       "device_api": "cpu"|"cuda"|"opencl" (tvm; default cpu), "threads": 2, "inputs": in.npy,
       "batches": [1, 64],
       "warmup": 5, "min_repeats": 10, "max_repeats": 200, "max_seconds": 8.0, "rel_tol": 0.02,
       "eval_inputs": eval.npy | null, "eval_outputs": out.npy | null, "eval_batch": 100}
result: {"latency": {"batch_1": {median_ms, p90_ms, min_ms, repeat, stable, seconds}, ...},
         "rss_after_import_mb", "peak_rss_mb", "model_rss_mb", "load_seconds"}
Errors: one `ERROR <message>` line on stderr, exit status 3.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

__all__ = ["time_until_stable", "main"]


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    mb = _status_mb("VmRSS")
    return float("nan") if mb is None else mb


def _peak_mb() -> float:
    # VmHWM: this process image's high-water RSS. ru_maxrss is not used first: Linux carries the forking
    # parent's peak across exec, so every worker started from a torch-loaded parent would report the parent's
    # ~1 GB.
    mb = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if mb is None else mb  # KiB on Linux


def time_until_stable(call, *, warmup: int = 5, min_repeats: int = 10, max_repeats: int = 200,
                      max_seconds: float = 8.0, rel_tol: float = 0.02) -> dict:
    """Warm up, then time `call()` until the running median moves by less than rel_tol between two checks
    (at least min_repeats samples), or max_repeats / max_seconds is reached. Milliseconds."""
    for _ in range(max(0, warmup)):
        call()
    samples: list[float] = []
    chunk = max(5, min_repeats // 2)
    stable, last_median = False, None
    t_start = time.perf_counter()
    while len(samples) < max_repeats:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
        if len(samples) % chunk == 0 and len(samples) >= min_repeats:
            med = float(np.median(samples))
            if last_median is not None and abs(med - last_median) <= rel_tol * med:
                stable = True
                break
            last_median = med
        if time.perf_counter() - t_start > max_seconds and len(samples) >= 3:
            break
    ms = np.asarray(samples) * 1e3
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "min_ms": round(float(ms.min()), 4), "repeat": int(ms.size), "stable": stable,
            "seconds": round(time.perf_counter() - t_start, 2)}


def _tvm_engine(path: str, threads: int, api: str = "cpu"):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    # A GPU build: the input is uploaded once, outside the timed call; each call ends by copying the logits
    # back, which also waits for the kernels to finish.
    dev = {"cpu": tvm.cpu, "cuda": tvm.cuda, "opencl": tvm.opencl}[api](0)
    vm = VirtualMachine(tvm.runtime.load_module(path), dev)
    main = vm["main"]

    def first(out):
        return out.numpy() if hasattr(out, "numpy") else first(out[0])

    def make_call(x: np.ndarray):
        t = tvm.runtime.tensor(np.ascontiguousarray(x), dev)
        return lambda: first(main(t))

    return make_call


def _ort_engine(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def make_call(x: np.ndarray):
        x = np.ascontiguousarray(x)
        return lambda: sess.run(None, {name: x})[0]

    return make_call


def _tile(x: np.ndarray, b: int) -> np.ndarray:
    reps = -(-b // x.shape[0])
    return np.concatenate([x] * reps)[:b] if reps > 1 else x[:b]


def run(spec: dict) -> dict:
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    if spec["kind"] == "tvm":
        make_call = _tvm_engine(spec["path"], int(spec["threads"]), spec.get("device_api", "cpu"))
    else:
        make_call = _ort_engine(spec["path"], int(spec["threads"]))
    load_s = time.perf_counter() - t0
    x = np.load(spec["inputs"])
    lat = {}
    for b in spec["batches"]:
        call = make_call(_tile(x, int(b)))
        lat[f"batch_{b}"] = {"batch": int(b), **time_until_stable(
            call, warmup=spec.get("warmup", 5), min_repeats=spec.get("min_repeats", 10),
            max_repeats=spec.get("max_repeats", 200), max_seconds=spec.get("max_seconds", 8.0),
            rel_tol=spec.get("rel_tol", 0.02))}
    peak = _peak_mb()  # before the eval set: its inputs would count as the model's memory
    res = {"latency": lat, "rss_after_import_mb": round(rss0, 1), "peak_rss_mb": round(peak, 1),
           "model_rss_mb": round(peak - rss0, 1), "load_seconds": round(load_s, 3)}
    if spec.get("eval_inputs"):
        ev = np.load(spec["eval_inputs"])
        bs = int(spec.get("eval_batch", 100))
        outs = []
        for i in range(0, len(ev), bs):
            chunk = ev[i:i + bs]
            outs.append(np.asarray(make_call(chunk)(), dtype=np.float32)[: len(chunk)])
        np.save(spec["eval_outputs"], np.concatenate(outs))
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with open(argv[0]) as f:
            spec = json.load(f)
        os.environ.setdefault("TVM_NUM_THREADS", str(spec.get("threads", 1)))
        res = run(spec)
        with open(argv[1], "w") as f:
            json.dump(res, f)
    except Exception as e:  # noqa: BLE001 - one line back to the parent
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        print(f"ERROR {type(e).__name__}: {lines[-1] if lines else ''}"[:400], file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
