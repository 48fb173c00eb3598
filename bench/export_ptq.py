"""PTQ benchmark (issues 4 and 16): Plateau's export against onnxruntime's quantizer, no training.

    .venv/bin/python bench/export_ptq.py --model resnet20 [--limit N] [--configs a,b]     # CIFAR ResNet-20
    .venv/bin/python bench/export_ptq.py --model vit [--limit N] [--configs a,b]          # the shared ViT-Tiny

Each Plateau configuration runs through `plateau export` (the real CLI parser; calibration on TRAIN images,
validation on the test split), so its report holds FP, reference and onnxruntime top-1 and onnxruntime's agreement
with the reference. Configurations with anything below 8 bits are also written in the native 4-bit layout from the
same reference and run on onnxruntime beside the default (widened) file, with the count of convs / matmuls it ran in
integer kernels. onnxruntime's quantize_static (QDQ, per-channel, min-max) runs on the same FP32 graph and
calibration images. Writes bench/results/export_ptq[_vit].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# model preset -> (export arguments naming the model, {config: its export arguments})
MODELS = {
    "resnet20": (["--model", "cifar_resnet20",
                  "--checkpoint", str(SHARED / "models/cifar-resnet/resnet20-12fca82f.th")], {
        "W8A8": ["--bits", "W8A8", "--fast"],
        "W8A8-u8": ["--bits", "W8A8", "--fast", "--act-unsigned"],
        "W4A8-nearest": ["--bits", "W4A8", "--fast"],
        "W4A8": ["--bits", "W4A8"],  # the default below 8 bits (learned rounding per block, learned clipping)
        "W4A4-fl8": ["--bits", "W4A4", "--keep-first-last-8bit"],
        "W4A8-brecq": ["--bits", "W4A8", "--no-learn-act-clip"],
        "W4A8-adaround-layer": ["--bits", "W4A8", "--reconstruction", "layer", "--no-learn-act-clip"],
        "W4A4-brecq-clip-fl8": ["--bits", "W4A4", "--keep-first-last-8bit", "--learn-act-clip"],
        # mixed precision: 5 stored bits per weight on average (some layers at 8, the rest at 4) against uniform
        "W4A8-nearest-mp5-kl": ["--bits", "W4A8", "--fast", "--mixed-precision", "5", "--sensitivity", "kl"],
        "W4A8-nearest-mp5-fisher": ["--bits", "W4A8", "--fast", "--mixed-precision", "5", "--sensitivity", "fisher"],
        "W4A8-nearest-mp4.5-kl": ["--bits", "W4A8", "--fast", "--mixed-precision", "4.5", "--sensitivity", "kl"],
        "W4A8-nearest-mp4.5-fisher": ["--bits", "W4A8", "--fast", "--mixed-precision", "4.5", "--sensitivity",
                                      "fisher"],
        "W4A8-nearest-mp6-kl": ["--bits", "W4A8", "--fast", "--mixed-precision", "6", "--sensitivity", "kl"],
        "W4A8-nearest-mp6-fisher": ["--bits", "W4A8", "--fast", "--mixed-precision", "6", "--sensitivity", "fisher"],
        "W3A8": ["--bits", "W3A8"],
        "W2A8": ["--bits", "W2A8"],
        "W2A8-mp5-kl": ["--bits", "W2A8", "--mixed-precision", "5", "--sensitivity", "kl"],
        "W2A8-mp5-fisher": ["--bits", "W2A8", "--mixed-precision", "5", "--sensitivity", "fisher"],
    }),
    "vit": (["--model", "vit_tiny_patch16_224", "--img-size", "32",
             "--checkpoint", str(SHARED / "models/cifar-vit/vit_tiny_c10.pt")], {
        "W8A8": ["--bits", "W8A8"],
        "W8A8-integer-only": ["--bits", "W8A8", "--integer-only"],
        "W4A8": ["--bits", "W4A8"],
        "W4A4": ["--bits", "W4A4"],
        "W3A3": ["--bits", "W3A3"],
        "W4A4-fast": ["--bits", "W4A4", "--fast"],
        "W3A3-fast": ["--bits", "W3A3", "--fast"],
        "W4A4-int-only": ["--bits", "W4A4", "--integer-only"],
        "W4A8-fast": ["--bits", "W4A8", "--fast"],
        "W4A8-fast-mp5-kl": ["--bits", "W4A8", "--fast", "--mixed-precision", "5", "--sensitivity", "kl"],
        "W4A8-fast-mp5-fisher": ["--bits", "W4A8", "--fast", "--mixed-precision", "5", "--sensitivity", "fisher"],
    }),
}


def export_args(run: Path, model: list[str], data: Path, limit: int | None, config: list[str]) -> argparse.Namespace:
    """The arguments `plateau export` would parse for this run and configuration."""
    from plateau.export import stage

    p = argparse.ArgumentParser()
    p.add_argument("--run")
    stage.add_arguments(p)
    argv = ["--run", str(run), *model, "--data", str(data), *config]
    return p.parse_args(argv + (["--eval-limit", str(limit)] if limit else []))


def ort_quantizer(fp32: Path, out: Path, data: Path, mean, std, weight: str, act: str) -> Path:
    """onnxruntime's quantize_static (QDQ, per channel, min-max) on 512 train images."""
    import numpy as np

    from plateau.data import batches, load_split
    from plateau.ort_quantizer import ort_quantize

    train = load_split(data, "train")
    calib = np.concatenate([x.numpy() for x, _ in batches(train, 64, mean, std, shuffle=True, limit=512)])
    return ort_quantize(fp32, calib, out, "qdq", act, weight, batch=64)


def _ort_on_export(d: Path, data: str, model: str | bytes) -> tuple:
    """(onnxruntime's logits for `model` on the export's test images, the export's report and reference logits,
    the labels); `model` is a path or serialized ONNX."""
    import numpy as np

    from plateau.data import load_split
    from plateau.export.validate import logits_of, ort_fn, ort_session

    rep = json.loads((d / "report.json").read_text())
    man = json.loads((d / "manifest.json").read_text())
    ref = np.load(d / "reference_logits.npy")
    test = load_split(data, "test")
    if (d / "test_indices.npy").exists():
        test = test.subset(np.load(d / "test_indices.npy"))
    lg = logits_of(ort_fn(ort_session(model)), test, man["plateau_cfg"]["mean"], man["plateau_cfg"]["std"],
                   limit=len(ref))
    return lg, rep, ref, test.labels


def _native_layout(d: Path, data: str) -> dict | None:
    """onnxruntime on the same reference written in the native 4-bit layout (DequantizeLinear straight off INT4,
    QuantizeLinear to INT4), beside the default widened one: same meaning, but onnxruntime has no integer kernel
    for INT4 and runs those convs in float. None when the export has nothing below 8 bits."""
    import onnx

    from plateau.export import load_reference, to_qdq_onnx
    from plateau.export.validate import compare_logits, ort_kernels

    ref = load_reference(d / "reference.pt")
    if all(w.qtype.bits == 8 for w in ref.weights.values()) and all(a.qtype.bits == 8 for a in ref.acts.values()):
        return None
    path = d / "model_qdq_native.onnx"
    try:
        onnx.save(to_qdq_onnx(ref, four_bit="native"), str(path))
    except ValueError as e:  # integer ops (a transformer's exact / integer-only islands) need the widened layout
        return {"error": str(e)}
    lg, rep, rl, _ = _ort_on_export(d, data, str(path))
    return {**compare_logits(lg, rl, rep["output_step"]), "onnxruntime_kernels": ort_kernels(path)}


def _revalidate(d: Path, data: str) -> dict:
    """An existing export's report with onnxruntime's logits measured again (same test images, same reference)."""
    from plateau.export.validate import compare_logits, ort_kernels, top1

    try:
        lg, rep, ref, labels = _ort_on_export(d, data, str(d / "model_qdq.onnx"))
        rep["top1"]["onnxruntime_qdq"] = top1(lg, labels)
        rep["onnxruntime_vs_reference"] = compare_logits(lg, ref, rep["output_step"])
        rep["onnxruntime_kernels"] = ort_kernels(d / "model_qdq.onnx")
        rep.pop("onnxruntime_error", None)
    except Exception as e:  # onnxruntime cannot run some configurations (e.g. 4-bit activations)
        rep = json.loads((d / "report.json").read_text())
        rep["onnxruntime_error"] = str(e).splitlines()[0][:300]
    rep["revalidated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return rep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(SHARED / "data/cifar10"))
    p.add_argument("--model", default="resnet20", choices=tuple(MODELS))
    p.add_argument("--limit", type=int, default=None, help="test images (default all 10,000)")
    p.add_argument("--configs", default=None, help="comma list (default: every config of the model)")
    p.add_argument("--out", default=None, help="run folders (default runs/bench-ptq[-vit])")
    p.add_argument("--reuse-exports", action="store_true",
                   help="keep each config's existing export (its reference logits) and re-run only onnxruntime on it")
    p.add_argument("--no-ort-quantizer", action="store_true",
                   help="skip onnxruntime's quantize_static rows (three more 10,000-image evaluations)")
    p.add_argument("--results", default=None,
                   help="results file name under bench/results (default export_ptq[_vit].json)")
    a = p.parse_args()
    model_args, configs = MODELS[a.model]
    a.configs = a.configs or ",".join(configs)
    a.out = a.out or str(ROOT / ("runs/bench-ptq" if a.model == "resnet20" else f"runs/bench-ptq-{a.model}"))
    from plateau.data import load_split
    from plateau.export import stage
    from plateau.export.validate import logits_of, ort_fn, ort_session, top1

    rows = {}
    for name in a.configs.split(","):
        t0 = time.time()
        run = Path(a.out) / name
        if a.reuse_exports and (run / "export" / "reference_logits.npy").exists():
            rep = _revalidate(run / "export", a.data)
        else:
            rep = stage.main(export_args(run, model_args, Path(a.data), a.limit, configs[name]))
        rows[name] = {"top1": rep["top1"], "onnxruntime_vs_reference": rep.get("onnxruntime_vs_reference"),
                      "onnxruntime_kernels": rep.get("onnxruntime_kernels"),
                      "onnxruntime_error": rep.get("onnxruntime_error"), "seconds": round(time.time() - t0, 1),
                      "qdq_bytes": (run / "export" / "model_qdq.onnx").stat().st_size,
                      "fp32_bytes": (run / "export" / "model_fp32.onnx").stat().st_size, "config": configs[name]}
        if rep.get("mixed_precision"):
            rows[name]["mixed_precision"] = rep["mixed_precision"]
        native = _native_layout(run / "export", a.data)
        if native is not None:
            rows[name]["onnxruntime_native_layout_vs_reference"] = native
    # onnxruntime's own quantizer on the same FP32 graph (from the first run's export).
    first = Path(a.out) / a.configs.split(",")[0] / "export"
    man = json.loads((first / "manifest.json").read_text())
    mean, std = man["plateau_cfg"]["mean"], man["plateau_cfg"]["std"]
    test = load_split(a.data, "test")
    if (first / "test_indices.npy").exists():  # the exports' test images (a random subset under --limit)
        import numpy as np

        test = test.subset(np.load(first / "test_indices.npy"))
    ort_rows = () if a.no_ort_quantizer else (("ort-W8A8-U8S8", "s8", "u8"), ("ort-W4A8", "s4", "u8"),
                                              ("ort-W4A4", "s4", "s4"))
    for name, w, act in ort_rows:
        t0 = time.time()
        try:
            q = ort_quantizer(first / "model_fp32.onnx", Path(a.out) / f"{name}.onnx", Path(a.data), mean, std, w, act)
            lg = logits_of(ort_fn(ort_session(q)), test, mean, std)
            rows[name] = {"top1": {"onnxruntime": top1(lg, test.labels)}, "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # report what onnxruntime cannot do
            rows[name] = {"error": str(e).splitlines()[0][:200]}
    result = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "test_images": a.limit or 10000,
              "rows": rows}
    name = "export_ptq" if a.model == "resnet20" else f"export_ptq_{a.model}"
    out = ROOT / "bench" / "results" / (a.results or f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| config | FP32 | reference | onnxruntime | ORT vs ref: top-1 agreement | bit-exact | within 1 step | max "
          "| ORT kernels int/float | native 4-bit layout: agreement / bit-exact / max / ORT kernels int/float "
          "| QDQ / FP32 bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r.get("top1", {})
        c = r.get("onnxruntime_vs_reference") or {}
        f = lambda v: f"{100 * v:.2f}%" if isinstance(v, float) else "-"  # noqa: E731
        ort = t.get("onnxruntime_qdq", t.get("onnxruntime"))
        ort_txt = f(ort) if ort is not None else r.get("error", "-")
        print(f"| {name} | {f(t.get('fp32'))} | {f(t.get('reference'))} | {ort_txt} | "
              f"{f(c.get('top1_agreement'))} | {f(c.get('bit_exact'))} | {f(c.get('within_one_step'))} | "
              f"{c.get('max_steps', '-')} | {_kernels(r.get('onnxruntime_kernels'))} | "
              f"{_native_cell(r.get('onnxruntime_native_layout_vs_reference'))} | "
              f"{_ratio(r)} |")


def _kernels(k: dict | None) -> str:
    return f"{k['integer']} / {k['float']}" if k else "-"


def _native_cell(t: dict | None) -> str:
    if not t or "error" in t:
        return "-"
    return (f"{100 * t['top1_agreement']:.2f}% / {100 * t['bit_exact']:.2f}% / {t['max_steps']} / "
            f"{_kernels(t['onnxruntime_kernels'])}")


def _ratio(r: dict) -> str:
    if "qdq_bytes" not in r:
        return "-"
    return f"{r['qdq_bytes']} / {r['fp32_bytes']} ({r['qdq_bytes'] / r['fp32_bytes']:.3f}x)"


if __name__ == "__main__":
    main()
