"""Compile integer parity (issue 5): ResNet-20 QDQ graphs -> TVM libraries for host and arm64 -> compare.

Models (all from the pretrained CIFAR ResNet-20, W8A8 unless named):
  plateau_s8     `plateau export` (int8 activations)            runs/r20
  plateau_u8     `plateau export --act-unsigned` (uint8)        runs/r20u
  plateau_w4a8   `plateau export --bits W4A8`                   runs/r20w4
  ort_u8s8       onnxruntime quantize_static, QDQ per-channel, uint8 activations, 512 train images
  ort_s8s8       the same with int8 activations

For each: compile for `host` and `arm64` (+dotprod); run the host library on the test split, the arm64 one
under qemu on the first --qemu-images; compare with onnxruntime (every model) and with Plateau's integer
reference (Plateau exports, first --ref-images): bit-exact logits, max difference in output steps, top-1
agreement. Writes bench/results/compile_parity.json and prints a Markdown section.

    .venv/bin/python bench/compile_parity.py [--ref-images 2000] [--qemu-images 200] [--qemu-full plateau_s8,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from plateau.compile import compile_onnx, get_target, lower_qdq
from plateau.compile.compiler import build, import_onnx, lower_for_target
from plateau.compile.onnx_prep import output_step
from plateau.data import batches, load_split
from plateau.export.stage import load_reference
from plateau.export.validate import ORT_INT8_QDQ, ort_session
from plateau.runtime import run_artifact

DATA = "/work/shared/data/cifar10"
PLATEAU = {"plateau_s8": "runs/r20", "plateau_u8": "runs/r20u", "plateau_w4a8": "runs/r20w4"}
ORT = {"ort_u8s8": "u8", "ort_s8s8": "s8"}


def ort_quantize(fp32: Path, out: Path, act: str, calib: list[np.ndarray]) -> Path:
    """onnxruntime's quantize_static QDQ model (s8 per-channel weights), made once."""
    from plateau.ort_quantizer import ort_quantize as quantize_static

    if out.exists():
        return out
    return quantize_static(fp32, np.concatenate(calib), out, "qdq", act, "s8", batch=len(calib[0]))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def compare(ours: np.ndarray, ref: np.ndarray, step: float) -> dict:
    d = np.rint(np.abs(ours.astype(np.float64) - ref.astype(np.float64)) / step)
    return {"images": int(len(ours)), "bit_exact_logits": float((d == 0).mean()),
            "bit_exact_images": float((d == 0).all(axis=1).mean()), "max_steps": int(d.max()),
            "top1_agreement": float((ours.argmax(1) == ref.argmax(1)).mean())}


def sdot_per_kernel(onnx_path: Path) -> dict[str, int]:
    """Build for arm64-dotprod and count `sdot` per conv kernel (with the parallel loop bodies it launches)."""
    from plateau.compile.asm import instructions_per_function

    mod, _ = import_onnx(onnx_path)
    tgt = get_target("arm64-dotprod")
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    counts = instructions_per_function(ex.mod.imports[0].inspect_source("asm"), "sdot")
    return {k: v for k, v in counts.items() if "conv2d" in k}


def gpu_sources(onnx_path: Path, out: Path) -> dict:
    """Compile the W8A8 export for cuda and opencl (no GPU here): kernels, dp4a calls per kernel, runs_here."""
    res = {}
    for target in ("cuda", "opencl"):
        t = time.time()
        m = compile_onnx(onnx_path, target, out / "plateau_s8" / target)
        res[target] = {"compile_seconds": round(time.time() - t, 1), "ops": m["ops"],
                       "float_islands": m["float_islands"],
                       "device_source": m["device_source"], "runs_here": m["runs_here"], "run_note": m["run_note"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-images", type=int, default=2000)
    ap.add_argument("--qemu-images", type=int, default=200)
    ap.add_argument("--qemu-full", default="", help="comma-separated models whose arm64 library runs under qemu on "
                    "the whole test split (the others take --qemu-images)")
    ap.add_argument("--out", default="runs/compile_parity")
    ap.add_argument("--gpu-only", action="store_true", help="only add the cuda / opencl builds to the results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu_only:
        res_path = Path("bench/results/compile_parity.json")
        results = json.loads(res_path.read_text()) if res_path.exists() else {}
        results["gpu"] = gpu_sources(Path(PLATEAU["plateau_s8"]) / "export" / "model_qdq.onnx", out)
        res_path.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["gpu"], indent=1))
        return
    torch.set_num_threads(2)

    # Data: the test split and 512 calibration images from train, normalized like `plateau export`.
    man = json.loads((Path(PLATEAU["plateau_s8"]) / "export" / "manifest.json").read_text())
    mean, std = man["plateau_cfg"]["mean"], man["plateau_cfg"]["std"]
    test = load_split(DATA, "test")
    x_test = np.concatenate([x.numpy() for x, _ in batches(test, 500, mean, std)]).astype(np.float32)
    labels = test.labels
    train = load_split(DATA, "train")
    calib = [x.numpy() for x, _ in batches(train, 128, mean, std, shuffle=True, seed=0, limit=512)]

    models = {k: Path(v) / "export" / "model_qdq.onnx" for k, v in PLATEAU.items()}
    fp32 = Path(PLATEAU["plateau_s8"]) / "export" / "model_fp32.onnx"
    for k, act in ORT.items():
        models[k] = ort_quantize(fp32, out / f"{k}.onnx", act, calib)

    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "test_images": int(len(x_test)), "models": {},
                     "onnxruntime": {"version": ort_version(), "session_config": dict(ORT_INT8_QDQ)}}
    for name, path in models.items():
        r: dict = {"onnx": str(path)}
        step = output_step(path)
        sess = ort_session(path)  # int8 QDQ allowed: onnxruntime runs S8S8 convs in integers on x86 too
        t = time.time()
        ort_out = np.concatenate([sess.run(None, {"input": x_test[i:i + 500]})[0] for i in range(0, len(x_test), 500)])
        r["ort_seconds"] = round(time.time() - t, 1)
        r["top1"] = {"onnxruntime": float((ort_out.argmax(1) == labels).mean())}
        for target in ("host", "arm64"):
            t = time.time()
            m = compile_onnx(path, target, out / name / target)
            r[f"{target}_compile_seconds"] = round(time.time() - t, 1)
            r[f"{target}_manifest"] = {k: m[k] for k in ("ops", "float_islands", "weight_bytes",
                                                        "library_weight_bytes", "weight_bits")}
        t = time.time()
        host = run_artifact(out / name / "host", x_test, batch_size=500).outputs
        r["host_seconds"] = round(time.time() - t, 1)
        r["top1"]["tvm_host"] = float((host.argmax(1) == labels).mean())
        r["host_vs_onnxruntime"] = compare(host, ort_out, step)
        n_q = len(x_test) if name in args.qemu_full.split(",") else min(args.qemu_images, len(x_test))
        t = time.time()
        arm = run_artifact(out / name / "arm64", x_test[:n_q], device="qemu", batch_size=100).outputs
        r["qemu_seconds"] = round(time.time() - t, 1)
        r["qemu_images_per_s"] = round(n_q / r["qemu_seconds"], 1)
        r["arm64_qemu_vs_host"] = compare(arm, host[:n_q], step)
        r["arm64_qemu_vs_onnxruntime"] = compare(arm, ort_out[:n_q], step)
        if name in PLATEAU:
            ref = load_reference(Path(PLATEAU[name]) / "export" / "reference.pt")
            n_r = args.ref_images
            t = time.time()
            with torch.no_grad():
                ref_out = np.concatenate([ref(torch.from_numpy(x_test[i:i + 250])).numpy()
                                          for i in range(0, n_r, 250)])
            r["reference_seconds"] = round(time.time() - t, 1)
            r["host_vs_reference"] = compare(host[:n_r], ref_out, step)
            r["arm64_qemu_vs_reference"] = compare(arm, ref_out[:n_q], step)
            r["onnxruntime_vs_reference"] = compare(ort_out[:n_r], ref_out, step)
            r["top1"]["reference_first_n"] = float((ref_out.argmax(1) == labels[:n_r]).mean())
        results["models"][name] = r
        print(name, json.dumps(r, indent=1), flush=True)
        Path("bench/results").mkdir(parents=True, exist_ok=True)
        Path("bench/results/compile_parity.json").write_text(json.dumps(results, indent=1))

    w8 = results["models"]["plateau_s8"]["host_manifest"]["library_weight_bytes"]
    w4 = results["models"]["plateau_w4a8"]["host_manifest"]["library_weight_bytes"]
    results["w4a8_weight_ratio"] = w4 / w8
    results["sdot_per_conv_kernel"] = sdot_per_kernel(models["plateau_s8"])
    Path("bench/results/compile_parity.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("w4a8_weight_ratio", "sdot_per_conv_kernel")}, indent=1))


if __name__ == "__main__":
    main()
