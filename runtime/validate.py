"""`plateau validate`: run the compiled artifact on a device over the test split and hold it to the reference.

Reads <run>/export (reference logits, onnxruntime logits, labels, data) and <run>/compile/<target> (model.so),
writes <run>/validate/<target>/report.json and report.md. Emulated runs say so in every line that reports speed.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from plateau.artifacts import read_manifest, sha256_file, write_json, write_text
from plateau.data import batches, load_split
from plateau.errors import PlateauError

from .run import DEVICES, elf_machine, run_artifact

__all__ = ["add_arguments", "main", "compare_logits", "render_report"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host", help="compiled target folder under <run>/compile (default host)")
    p.add_argument("--device", choices=DEVICES, help="where to run: local (default for host builds), qemu "
                                                     "(default for arm64 builds without --rpc), rpc")
    p.add_argument("--rpc", help="HOST:PORT of a board running `plateau device serve` (implies --device rpc)")
    p.add_argument("--rpc-key", help="key the board's server was started with")
    p.add_argument("--limit", type=int, help="validate on the first N test images (default: all that export "
                                             "validated)")
    p.add_argument("--batch-size", type=int, default=100)


def compare_logits(device: np.ndarray, reference: np.ndarray, step: float) -> dict:
    """Differences counted in output quantization steps, and top-1 agreement (same rule as export's report)."""
    from plateau.export.validate import compare_logits as _cmp

    return _cmp(device, reference, step)


def _pick_device(args: argparse.Namespace, lib: Path) -> str:
    if args.rpc:
        return "rpc"
    if args.device:
        return args.device
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return "local" if elf_machine(lib) == host else "qemu"


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    exp = read_manifest(run / "export", "export")
    comp_dir = run / "compile" / args.target
    comp = read_manifest(comp_dir, "compile")
    onnx_rec = comp.get("inputs", {}).get("onnx", {})
    if onnx_rec.get("sha256") and exp.get("qdq_sha256") and onnx_rec["sha256"] != exp["qdq_sha256"]:
        raise PlateauError(f"{comp_dir}/model.so is stale: it was compiled from another export of "
                           f"{onnx_rec.get('path')}; run `plateau compile --target {args.target}` again")
    lib = comp_dir / "model.so"
    device = _pick_device(args, lib)

    ref = np.load(run / "export" / "reference_logits.npy")
    labels = np.load(run / "export" / "labels.npy")
    ort_path = run / "export" / "ort_logits.npy"
    ort = np.load(ort_path) if ort_path.is_file() else None
    n = len(ref) if args.limit is None else min(args.limit, len(ref))
    cfg = exp["plateau_cfg"]
    test = load_split(exp["config"]["data"], "test", exp["config"].get("img_size"))
    x = np.concatenate([xb.numpy() for xb, _ in batches(test, 500, cfg["mean"], cfg["std"], limit=n)])

    t0 = time.time()
    res = run_artifact(lib, x, device, batch_size=args.batch_size, rpc=args.rpc, rpc_key=args.rpc_key)
    seconds = time.time() - t0
    out = res.outputs
    step = float(exp["quantization"]["output"]["scale"])
    report = {
        "run": str(run), "target": args.target, "device": res.device, "emulated": res.emulated,
        "artifact": {"path": str(lib), "sha256": sha256_file(lib), "machine": elf_machine(lib)},
        "model": exp.get("model"), "bits": exp["config"].get("bits"), "data": exp["config"]["data"],
        "test_images": int(n),
        "top1": {"device": float((out.argmax(1) == labels[:n]).mean()),
                 "reference": float((ref[:n].argmax(1) == labels[:n]).mean())},
        "device_vs_reference": compare_logits(out, ref[:n], step),
        "seconds": round(seconds, 1),
        "note": ("emulated with qemu-aarch64: correctness only, timings are not representative" if res.emulated
                 else "run on this machine"),
    }
    export_report = run / "export" / "report.json"
    if export_report.is_file():
        import json

        fp = json.loads(export_report.read_text())["top1"].get("fp32")
        if fp is not None:
            report["top1"]["fp32"] = fp
    if ort is not None:
        report["top1"]["onnxruntime"] = float((ort[:n].argmax(1) == labels[:n]).mean())
        report["device_vs_onnxruntime"] = compare_logits(out, ort[:n], step)
    out_dir = run / "validate" / args.target
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", render_report(report))
    print(render_report(report))
    return report


def render_report(r: dict) -> str:
    emu = " (EMULATED: qemu-aarch64, correctness only)" if r["emulated"] else ""
    lines = [f"# Validation: {r['model']} {r['bits']} on {r['target']}, device {r['device']}{emu}", "",
             f"{r['test_images']} test images of `{r['data']}`; artifact `{r['artifact']['path']}` "
             f"({r['artifact']['machine']}).", "", "| model | top-1 |", "|---|---|"]
    for k, v in r["top1"].items():
        lines.append(f"| {k} | {100 * v:.2f}% |")
    for key, name in (("device_vs_reference", "fake-quant reference"), ("device_vs_onnxruntime", "onnxruntime")):
        c = r.get(key)
        if c:
            lines.append(f"\nDevice against the {name}: top-1 agreement {100 * c['top1_agreement']:.2f}%, logits "
                         f"bit-exact {100 * c['bit_exact']:.3f}%, within one step {100 * c['within_one_step']:.3f}%, "
                         f"max {c['max_steps']} steps.")
    lines.append(f"\nWall time {r['seconds']} s ({r['note']}).")
    return "\n".join(lines) + "\n"
