"""`plateau validate`: run the compiled artifact on a device over the test split and hold it to the reference.

Reads <run>/export (reference logits, onnxruntime logits, labels, data, reference.pt) and
<run>/compile/<target> (model.so), writes <run>/validate/<target>/: report.json, report.md, report.html (plots
embedded) and the PNGs.

    top-1 of the device, the fake-quant reference, onnxruntime and FP32; top-1 agreement of the device with
    the reference and with onnxruntime; logit differences in output steps.
    When the device leaves the reference by more than one step (or with --per-layer): a debug build of the
    same ONNX with every quantization point exposed runs on the same device, and the report names the FIRST
    layer whose integer outputs differ by more than one step, with the size of the difference per layer
    (plateau.runtime.layers).

Emulated runs say so in the title and in every line that reports time. Nothing is written unless the whole
validation succeeded: the report folder is replaced as a whole (plateau.staging). The export's files are read
only if they are the ones its manifest records (sha256), and the library only if it is the one compile recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from plateau.artifacts import load_npy, read_manifest, sha256_file, verify_file
from plateau.config_cli import int_at_least
from plateau.data import batches, check_classes, load_split
from plateau.errors import PlateauError
from plateau.staging import staged_output

from .run import DEVICES, elf_machine, host_machine, run_artifact

__all__ = ["add_arguments", "main", "compare_logits", "render_report", "check_artifact", "pick_device",
           "run_on_device", "QEMU_CPU_FEATURES", "onnx_record"]

# Features of the CPU models qemu-aarch64 emulates (QEMU_CPU=...), for a clear error before a SIGILL.
QEMU_CPU_FEATURES: dict[str, set[str]] = {
    "cortex-a53": set(), "cortex-a57": set(), "cortex-a72": set(), "a64fx": set(),
    "cortex-a55": {"dotprod"}, "cortex-a76": {"dotprod"}, "neoverse-n1": {"dotprod"},
    "cortex-a710": {"dotprod", "i8mm"}, "neoverse-v1": {"dotprod", "i8mm"},
    "neoverse-n2": {"dotprod", "i8mm"}, "max": {"dotprod", "i8mm"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="host",
                   help="compiled target folder under <run>/compile (default host)")
    p.add_argument("--device", choices=DEVICES, help="where to run: local (default for host builds), qemu "
                                                     "(default for arm64 builds without --rpc), rpc")
    p.add_argument("--rpc", help="HOST:PORT of a board running `plateau device serve` (implies --device rpc)")
    p.add_argument("--rpc-key", help="key the board's server was started with")
    p.add_argument("--limit", type=int_at_least(1), help="validate on the first N test images (default: all that "
                                                         "export validated)")
    p.add_argument("--batch-size", type=int_at_least(1), default=100)
    p.add_argument("--compiled", help="validate this compile folder (model.so + manifest.json) instead of "
                                      "<run>/compile/<target>, even if it was compiled from another ONNX "
                                      "(e.g. a modified copy): the report says so")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-layer", action="store_true", help="always run the per-layer comparison (default: "
                                                            "only when the device leaves the reference)")
    g.add_argument("--no-per-layer", action="store_true", help="never run the per-layer comparison")
    p.add_argument("--per-layer-images", type=int_at_least(1), default=8,
                   help="images for the per-layer comparison (the most divergent ones; default 8)")
    p.add_argument("--tolerance", type=int_at_least(0), default=1,
                   help="allowed difference in integer steps (default 1)")


def compare_logits(device: np.ndarray, reference: np.ndarray, step: float) -> dict:
    """Differences counted in output quantization steps, and top-1 agreement (same rule as export's
    report)."""
    from plateau.export.validate import compare_logits as _cmp

    return _cmp(device, reference, step)


# --- checks shared with `plateau bench` ---------------------------------------------------------------------
def check_artifact(comp_dir: Path, target: str, export_manifest: dict | None, *,
                   strict_onnx: bool = True) -> dict:
    """The compile manifest of comp_dir, checked: built for `target`, for that target's CPU, from the run's
    export.

    A mismatch is a one-line PlateauError saying what to do. strict_onnx=False accepts a library compiled from
    another ONNX (returns the manifest; the caller reports it).
    """
    comp = read_manifest(comp_dir, "compile")
    lib = comp_dir / "model.so"
    if not lib.is_file():
        raise PlateauError(f"{lib}: no such compiled model (run `plateau compile --target {target}`)")
    built_for = comp.get("target") or comp.get("config", {}).get("target")
    if built_for and built_for != target:
        raise PlateauError(f"{lib} was compiled for target {built_for!r}, not {target!r}: run "
                           f"`plateau compile --target {target}`")
    want = _target_machine(target)
    got = elf_machine(lib)
    if want and got != want:
        raise PlateauError(f"{lib} is {got} code but target {target!r} is {want}: the artifact was replaced; "
                           f"run `plateau compile --target {target}`")
    onnx_rec = onnx_record(comp)
    if strict_onnx and export_manifest is not None:
        if onnx_rec.get("sha256") and export_manifest.get("qdq_sha256") and \
                onnx_rec["sha256"] != export_manifest["qdq_sha256"]:
            raise PlateauError(f"{lib} is stale: it was compiled from another export of "
                               f"{onnx_rec.get('path')}; run `plateau compile --target {target}` again")
    return comp


def onnx_record(comp: dict) -> dict:
    """The compile manifest's record of the ONNX it compiled ({} when it has none, or a malformed one)."""
    rec = (comp.get("inputs") or {}).get("onnx")
    return rec if isinstance(rec, dict) else {}


def _target_machine(target: str) -> str | None:
    try:
        from plateau.compile import get_target

        t = get_target(target)
    except PlateauError:
        return None
    return "aarch64" if t.arch == "aarch64" else host_machine()


def needed_features(comp: dict) -> set[str]:
    """CPU features the library was compiled to use (from the manifest's TVM target)."""
    mattr = (comp.get("tvm_target") or {}).get("mattr") or []
    return {a.lstrip("+") for a in mattr if a.lstrip("+") in ("dotprod", "i8mm", "sve", "sve2")}


def pick_device(device: str | None, rpc: str | None, lib: Path) -> str:
    if rpc:
        return "rpc"
    if device:
        return device
    return "local" if elf_machine(lib) == host_machine() else "qemu"


def _check_emulated_cpu(comp: dict, device: str, target: str) -> None:
    cpu = os.environ.get("QEMU_CPU", "").strip().lower()
    if device != "qemu" or not cpu:
        return
    have = QEMU_CPU_FEATURES.get(cpu)
    missing = sorted(needed_features(comp) - have) if have is not None else []
    if missing:
        raise PlateauError(f"the emulated CPU QEMU_CPU={cpu} lacks {', '.join(missing)}, which target "
                           f"{target!r} uses: compile for a target without it (e.g. arm64-neon or rpi4) or "
                           "unset QEMU_CPU")


def run_on_device(lib: Path, x: np.ndarray, device: str, comp: dict, target: str, **kw):
    """run_artifact with device-side failures explained: a CPU without the features the build uses dies of
    SIGILL."""
    _check_emulated_cpu(comp, device, target)
    try:
        return run_artifact(lib, x, device, **kw)
    except PlateauError as e:
        msg = str(e)
        feats = needed_features(comp)
        sigill = "exit -4" in msg or "Illegal instruction" in msg or "signal 4" in msg
        died = device == "rpc" and any(s in msg.lower() for s in ("closed", "reset", "broken pipe", "eof"))
        if feats and (sigill or died):
            why = "illegal instruction" if sigill else "the session died while running it"
            raise PlateauError(f"{lib} failed on the {device} device ({why}): target {target!r} uses "
                               f"{', '.join(sorted(feats))}, which this CPU seems to lack; compile for "
                               "arm64-neon / rpi4 instead") from None
        raise


# --- the stage ----------------------------------------------------------------------------------------------
def _test_inputs(exp: dict, n: int, run: Path | None = None) -> np.ndarray:
    """The first n of the test images export validated (export's fixed subset when it used --eval-limit)."""
    return _test_set(exp, n, run)[0]


def _test_set(exp: dict, n: int, run: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of the first n test images export validated, checked to be the data export used: the
    same classes, and indices that exist."""
    cfg = exp["plateau_cfg"]
    size = exp["config"].get("img_size")
    test = load_split(exp["config"]["data"], "test", size if isinstance(size, int) else None)
    classes = exp.get("classes")
    if classes is not None:
        check_classes(test, classes, len(classes), "the export", exp["config"]["data"])
    folder = run / "export" if run is not None else None
    idx_file = verify_file(folder, exp, "test_indices.npy", "export", required=False) if folder else None
    if idx_file is not None:
        idx = load_npy(idx_file, "test image indices", 1, "iu")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(test)):
            raise PlateauError(f"{idx_file}: indices up to {int(idx.max())} but the test split of "
                               f"{exp['config']['data']} has {len(test)} images: the data changed since export; "
                               "run `plateau export` again")
        test = test.subset(idx)
    xs, ys = [], []
    for xb, yb in batches(test, 500, cfg["mean"], cfg["std"], limit=n):
        xs.append(xb.numpy())
        ys.append(yb.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _export_arrays(run: Path, exp: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Reference logits, labels and onnxruntime logits (None when export had none), each checked against the
    export manifest and for shape: one line naming the file when any is missing, changed or not an array."""
    folder = run / "export"
    ref = load_npy(verify_file(folder, exp, "reference_logits.npy", "export"), "reference logits", 2, "f")
    labels = load_npy(verify_file(folder, exp, "labels.npy", "export"), "test labels", 1, "iu")
    ort_path = verify_file(folder, exp, "ort_logits.npy", "export", required=False)
    ort = load_npy(ort_path, "onnxruntime logits", 2, "f") if ort_path is not None else None
    if len(labels) != len(ref) or (ort is not None and ort.shape != ref.shape):
        raise PlateauError(f"{folder}: reference_logits.npy {ref.shape}, labels.npy {labels.shape}"
                           + (f", ort_logits.npy {ort.shape}" if ort is not None else "")
                           + " do not belong together; run `plateau export` again")
    if len(labels) and (labels.min() < 0 or labels.max() >= ref.shape[1]):
        raise PlateauError(f"{folder / 'labels.npy'}: labels outside 0..{ref.shape[1] - 1}; run `plateau export` "
                           "again")
    return ref, labels, ort


def _divergent_images(out: np.ndarray, ref: np.ndarray, step: float, tolerance: int, k: int) -> list[int]:
    """Up to k images where the device leaves the reference: top-1 differs first, then the largest logit
    gap."""
    steps = np.rint(np.abs(out.astype(np.float64) - ref.astype(np.float64)) / step).max(1)
    flip = out.argmax(1) != ref.argmax(1)
    bad = np.flatnonzero(flip | (steps > tolerance))
    order = sorted(bad.tolist(), key=lambda i: (not flip[i], -steps[i], i))
    return order[:k]


def main(args: argparse.Namespace) -> dict:
    run = Path(args.run)
    exp = read_manifest(run / "export", "export")
    comp_dir = Path(args.compiled) if args.compiled else run / "compile" / args.target
    comp = check_artifact(comp_dir, args.target, exp, strict_onnx=not args.compiled)
    lib = comp_dir / "model.so"
    device = pick_device(args.device, args.rpc, lib)
    if args.per_layer_images < 1 or args.tolerance < 0:
        raise PlateauError("--per-layer-images must be >= 1 and --tolerance >= 0")

    ref, labels, ort = _export_arrays(run, exp)
    n = len(ref) if args.limit is None else min(args.limit, len(ref))
    x, y = _test_set(exp, n, run)
    if len(x) != n or not np.array_equal(y, labels[:n]):
        raise PlateauError(f"{run / 'export' / 'labels.npy'}: the test images of {exp['config']['data']} no longer "
                           "carry the labels export saw (the data changed since export); run `plateau export` again")

    t0 = time.time()
    res = run_on_device(lib, x, device, comp, args.target, batch_size=args.batch_size, rpc=args.rpc,
                        rpc_key=args.rpc_key)
    seconds = time.time() - t0
    out = res.outputs
    step = float(exp["quantization"]["output"]["scale"])
    if not step > 0 or not np.isfinite(step):
        raise PlateauError(f"{run / 'export' / 'manifest.json'}: output scale {step} is not a positive number; run "
                           "`plateau export` again")
    onnx_rec = onnx_record(comp)
    report: dict = {
        "run": str(run), "target": args.target, "device": res.device, "emulated": res.emulated,
        "machine": res.info.get("machine"),
        "artifact": {"path": str(lib), "sha256": sha256_file(lib), "machine": elf_machine(lib),
                     "bytes": lib.stat().st_size, "onnx": onnx_rec.get("path"),
                     "from_run_export": onnx_rec.get("sha256") == exp.get("qdq_sha256")},
        "model": exp.get("model"), "bits": exp["config"].get("bits"), "data": exp["config"]["data"],
        "test_images": int(n),
        "top1": {"device": float((out.argmax(1) == labels[:n]).mean()),
                 "reference": float((ref[:n].argmax(1) == labels[:n]).mean())},
        "device_vs_reference": compare_logits(out, ref[:n], step),
        "output_step": step,
        "seconds": round(seconds, 1),
        "note": ("emulated with qemu-aarch64: correctness only, timings are not representative"
                 if res.emulated else f"run on {res.info.get('machine') or 'this machine'}"),
    }
    export_report = verify_file(run / "export", exp, "report.json", "export", required=False)
    try:
        er = json.loads(export_report.read_text()) if export_report is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlateauError(f"{export_report}: not readable JSON ({e}); run `plateau export` again") from None
    if isinstance(er, dict) and isinstance(er.get("top1"), dict):
        fp = er["top1"].get("fp32")
        if fp is not None and er.get("test_images") == n:  # FP32 logits are not kept: only comparable on all
            report["top1"]["fp32"] = fp
        elif fp is not None:
            report["fp32_note"] = (f"FP32 top-1 {100 * fp:.2f}% was measured by export on "
                                   f"{er.get('test_images')} images")
    if ort is not None:
        report["top1"]["onnxruntime"] = float((ort[:n].argmax(1) == labels[:n]).mean())
        report["device_vs_onnxruntime"] = compare_logits(out, ort[:n], step)

    c = report["device_vs_reference"]
    agrees = c["max_steps"] <= args.tolerance and c["top1_agreement"] == 1.0
    out_dir = run / "validate" / args.target
    # The report folder is replaced as a whole; the per-layer debug build in it is kept for reuse.
    with staged_output(out_dir, keep=("debug",)) as stage:
        if args.no_per_layer or (agrees and not args.per_layer):
            report["per_layer"] = {"skipped": ("--no-per-layer" if args.no_per_layer else
                                               f"the device agrees with the reference within {args.tolerance} "
                                               "step(s) on every logit")}
        else:
            report["per_layer"] = _per_layer(args, run, comp, comp_dir, x, out, ref[:n], step, device, stage,
                                             exp)
            report["per_layer"]["debug_artifact"] = str(out_dir / "debug" / "model.so")
        doc = render_document(report, run)
        doc.write(stage, data=report)
    print(render_report(report))
    print(f"validate: report in {out_dir}/report.md and report.html")
    return report


def _per_layer(args, run: Path, comp: dict, comp_dir: Path, x: np.ndarray, out: np.ndarray, ref: np.ndarray,
               step: float, device: str, out_dir: Path, exp: dict) -> dict:
    from plateau.export.stage import load_reference

    from .layers import locate

    idx = _divergent_images(out, ref, step, args.tolerance, args.per_layer_images)
    if not idx:  # forced with --per-layer while everything agrees: the first images
        idx = list(range(min(args.per_layer_images, len(x))))
    rec = onnx_record(comp)
    onnx_path = Path(rec.get("path") or run / "export" / "model_qdq.onnx")
    if not onnx_path.is_file() or (rec.get("sha256") and sha256_file(onnx_path) != rec["sha256"]):
        raise PlateauError(f"{onnx_path}: the ONNX {comp_dir}/model.so was compiled from is gone or changed: "
                           "the per-layer debug build needs it (recompile, or pass --no-per-layer)")
    reference = load_reference(verify_file(run / "export", exp, "reference.pt", "export"))
    cfg = comp.get("config", {})
    t0 = time.time()
    debug_dir = out_dir / "debug"
    res = locate(reference, onnx_path, args.target, x[idx], debug_dir, device=device, rpc=args.rpc,
                 rpc_key=args.rpc_key, tolerance=args.tolerance, requant=cfg.get("requant", "float"),
                 allow_float=bool(cfg.get("allow_float", False)), images=idx)
    res["seconds"] = round(time.time() - t0, 1)
    return res


# --- rendering ----------------------------------------------------------------------------------------------
def _title(r: dict) -> str:
    emu = " (EMULATED: qemu-aarch64, correctness only)" if r["emulated"] else ""
    return f"Validation: {r['model']} {r['bits']} on {r['target']}, device {r['device']}{emu}"


def render_document(r: dict, run: Path | None = None, plots: bool = True):
    """The report as a Document (Markdown + HTML with plots; plots=False for the console)."""
    from .report import Document, accuracy_plot, layer_plot, pct, steps_plot

    doc = Document(_title(r))
    if r["emulated"]:
        doc.warning("Emulated with qemu-aarch64: the outputs are the arm64 code's real outputs, the times "
                    "are not.")
    a = r["artifact"]
    doc.text(f"{r['test_images']} test images of `{r['data']}`; artifact `{a['path']}` ({a['machine']}, "
             f"{a.get('bytes', 0) / 1e6:.2f} MB), device {r['device']} on {r.get('machine') or '?'}.")
    if r.get("reference"):
        doc.text(f"Reference: {r['reference']}; logits counted in steps of {r.get('output_step_source')}.")
    if r.get("float_islands") is not None:
        isl = r["float_islands"] if isinstance(r["float_islands"], list) else []
        kinds: dict[str, int] = {}
        for i in isl:
            k = str(i.get("op_type", i.get("kind", "?"))) if isinstance(i, dict) else str(i)
            kinds[k] = kinds.get(k, 0) + 1
        doc.text(f"Float islands in the compiled library: {len(isl)}"
                 + (f" ({', '.join(f'{v} {k}' for k, v in kinds.items())})" if kinds else "") + ".")
    if a.get("from_run_export") is False:
        doc.warning(f"This artifact was compiled from {a.get('onnx')}, not from the run's export: it is "
                    "validated against the run's reference anyway.")
    doc.heading("Accuracy")
    doc.table(["model", "top-1"], [[k, pct(v)] for k, v in r["top1"].items()])
    if r.get("fp32_note"):
        doc.text(r["fp32_note"] + ".")
    rows = []
    for key, name in (("device_vs_reference", "fake-quant reference"),
                      ("device_vs_onnxruntime", "onnxruntime")):
        c = r.get(key)
        if c:
            rows.append([name, pct(c["top1_agreement"]), pct(c["bit_exact"], 3), pct(c["within_one_step"], 3),
                         c["max_steps"]])
    doc.table(["device against", "top-1 agreement", "logits bit-exact", "within one step", "max steps"], rows)
    groups = {"fp32": {"PyTorch": r["top1"]["fp32"]}} if "fp32" in r["top1"] else {}
    groups[r["bits"] or "quantized"] = {k: v for k, v in r["top1"].items() if k != "fp32"}
    groups.update(_bench_accuracy(run, r["target"]) if run is not None else {})
    doc.figure("accuracy", accuracy_plot(groups) if plots else None, "top-1 per bit width")
    pairs = (("device_vs_reference", "vs reference"), ("device_vs_onnxruntime", "vs onnxruntime"))
    hist = {name: r[key]["step_histogram"] for key, name in pairs if key in r}
    doc.figure("logit_steps", steps_plot(hist) if plots else None, "logit differences in output steps")
    doc.heading("Per-layer comparison")
    pl = r.get("per_layer") or {}
    if "skipped" in pl:
        doc.text(f"Not run: {pl['skipped']}.")
    elif pl:
        first = pl["first_divergent"]
        emu = " (emulated)" if pl.get("emulated") else ""
        doc.text(f"Debug build `{pl['debug_artifact']}` run on {pl['device']}{emu} for test images "
                 f"{', '.join(map(str, pl['images']))}; each quantization point's integer output against "
                 f"`FakeQuantModel.intermediates`, tolerance {pl['tolerance_steps']} step.")
        if first:
            doc.warning(f"First layer off by more than {pl['tolerance_steps']} step: {first}")
        else:
            doc.text(f"Every layer is within {pl['tolerance_steps']} step of the reference.")
        doc.table(["layer", "op", "shape", "bit-exact", f"> {pl['tolerance_steps']} step", "max steps",
                   "mean abs steps"],
                  [[("**" + x["layer"] + "**") if x["layer"] == first else x["layer"], x["op"],
                    "x".join(map(str, x["shape"])), pct(x["bit_exact"], 3), pct(x["over_tolerance"], 3),
                    x["max_steps"], f"{x['mean_abs_steps']:.4f}"] for x in pl["layers"]])
        doc.figure("per_layer", layer_plot(pl["layers"], first, pl["tolerance_steps"]) if plots else None,
                   "per-layer difference")
    doc.text(f"Wall time {r['seconds']} s ({r['note']}).")
    return doc


def _bench_accuracy(run: Path, target: str) -> dict:
    """Top-1 of other bit widths measured by `plateau bench` on this target, if it ran."""
    path = run / "bench" / target / "report.json"
    try:
        b = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out: dict = {}
    for e in b.get("engines", []):
        if e.get("top1") is not None and e.get("bits") not in (None, "fp32"):
            out.setdefault(f"{e['bits']} (bench, {b.get('eval_images')} img)", {})[e["engine"]] = e["top1"]
    return out


def render_report(r: dict) -> str:
    """The Markdown report (text only)."""
    return render_document(r, plots=False).markdown() + "\n"
