"""Issue 4 benchmark: PTQ of the pretrained CIFAR ResNet-20 with no training, Plateau against onnxruntime's quantizer.

    .venv/bin/python bench/export_ptq.py [--data ../shared/data/cifar10] [--ckpt ...] [--limit N] [--configs a,b]

Each Plateau configuration runs through `plateau export` (calibration on 512-1024 TRAIN images, validation on the
test split), so its report holds FP, reference and onnxruntime top-1 and onnxruntime's agreement with the reference.
onnxruntime's quantize_static (QDQ, per-channel, min-max) runs on the same FP32 graph and calibration images.
Writes bench/results/export_ptq.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

CONFIGS = {
    "W8A8": dict(bits="W8A8"),
    "W8A8-u8": dict(bits="W8A8", act_unsigned=True),
    "W4A8": dict(bits="W4A8"),
    "W4A8-adaround": dict(bits="W4A8", rounding="adaround", weight_calibration="mse", calib_images=1024),
    "W4A4-adaround-fl8": dict(bits="W4A4", rounding="adaround", weight_calibration="mse", act_calibration="mse",
                              keep_first_last_8bit=True, calib_images=1024),
}


def export_args(run: Path, ckpt: Path, data: Path, limit: int | None, **kw) -> Namespace:
    base = dict(run=str(run), checkpoint=str(ckpt), model="cifar_resnet20", data=str(data), onnx=None, mean=None,
                std=None, bits="W8A8", act_calibration="minmax", weight_calibration="minmax", rounding="nearest",
                adaround_iters=500, keep_first_last_8bit=False, act_unsigned=False, calib_images=512,
                eval_limit=limit, img_size=None, mixed_precision=None)
    base.update(kw)
    return Namespace(**base)


def ort_quantizer(fp32: Path, out: Path, data: Path, mean, std, weight: str, act: str) -> Path:
    """onnxruntime's quantize_static (QDQ, per channel, min-max) on 512 train images."""
    import numpy as np

    from plateau.data import batches, load_split
    from plateau.runtime.bench import ort_quantize

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


def _int8_weight_twin(d: Path, data: str) -> dict | None:
    """onnxruntime on the same QDQ graph with its INT4 weight initializers widened to INT8 (same values, so the
    same QDQ semantics): onnxruntime has no integer kernel for INT4 weights and runs those convs in float; the
    twin shows what its integer kernels compute. None when the graph has no 4-bit weight."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    from plateau.export.validate import compare_logits

    m = onnx.load(str(d / "model_qdq.onnx"))
    four = [i for i, t in enumerate(m.graph.initializer) if t.data_type == TensorProto.INT4]
    zero_points = {n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    four_bit_acts = any(t.name in zero_points and t.data_type in (TensorProto.INT4, TensorProto.UINT4)
                        for t in m.graph.initializer)
    if not four or four_bit_acts:  # with 4-bit activations the twin is not a comparison onnxruntime can make
        return None
    for i in four:
        t = m.graph.initializer[i]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int8), t.name))
    try:
        lg, rep, ref, _ = _ort_on_export(d, data, m.SerializeToString())
    except Exception as e:  # 4-bit activations: onnxruntime may not run them at all
        return {"error": str(e).splitlines()[0][:200]}
    return compare_logits(lg, ref, rep["output_step"])


def _revalidate(d: Path, data: str) -> dict:
    """An existing export's report with onnxruntime's logits measured again (same test images, same reference)."""
    from plateau.export.validate import compare_logits, top1

    try:
        lg, rep, ref, labels = _ort_on_export(d, data, str(d / "model_qdq.onnx"))
        rep["top1"]["onnxruntime_qdq"] = top1(lg, labels)
        rep["onnxruntime_vs_reference"] = compare_logits(lg, ref, rep["output_step"])
        rep.pop("onnxruntime_error", None)
    except Exception as e:  # onnxruntime cannot run some configurations (e.g. 4-bit activations)
        rep = json.loads((d / "report.json").read_text())
        rep["onnxruntime_error"] = str(e).splitlines()[0][:300]
    rep["revalidated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return rep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(SHARED / "data/cifar10"))
    p.add_argument("--ckpt", default=str(SHARED / "models/cifar-resnet/resnet20-12fca82f.th"))
    p.add_argument("--limit", type=int, default=None, help="test images (default all 10,000)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=str(ROOT / "runs/bench-ptq"))
    p.add_argument("--reuse-exports", action="store_true",
                   help="keep each config's existing export (its reference logits) and re-run only onnxruntime on it")
    a = p.parse_args()
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
            rep = stage.main(export_args(run, Path(a.ckpt), Path(a.data), a.limit, **CONFIGS[name]))
        rows[name] = {"top1": rep["top1"], "onnxruntime_vs_reference": rep.get("onnxruntime_vs_reference"),
                      "onnxruntime_error": rep.get("onnxruntime_error"), "seconds": round(time.time() - t0, 1),
                      "config": CONFIGS[name]}
        twin = _int8_weight_twin(run / "export", a.data)
        if twin is not None:
            rows[name]["onnxruntime_int8_weight_twin_vs_reference"] = twin
    # onnxruntime's own quantizer on the same FP32 graph (from the first run's export).
    first = Path(a.out) / a.configs.split(",")[0] / "export"
    man = json.loads((first / "manifest.json").read_text())
    mean, std = man["plateau_cfg"]["mean"], man["plateau_cfg"]["std"]
    test = load_split(a.data, "test")
    for name, w, act in (("ort-W8A8-U8S8", "s8", "u8"), ("ort-W4A8", "s4", "u8"), ("ort-W4A4", "s4", "s4")):
        t0 = time.time()
        try:
            q = ort_quantizer(first / "model_fp32.onnx", Path(a.out) / f"{name}.onnx", Path(a.data), mean, std, w, act)
            lg = logits_of(ort_fn(ort_session(q)), test, mean, std, limit=a.limit)
            rows[name] = {"top1": {"onnxruntime": top1(lg, test.labels)}, "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # report what onnxruntime cannot do
            rows[name] = {"error": str(e).splitlines()[0][:200]}
    result = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "test_images": a.limit or 10000,
              "rows": rows}
    out = ROOT / "bench/results/export_ptq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| config | FP32 | reference | onnxruntime | ORT vs ref: top-1 agreement | bit-exact | within 1 step | max "
          "| INT8-weight twin: bit-exact / max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        t = r.get("top1", {})
        c = r.get("onnxruntime_vs_reference") or {}
        f = lambda v: f"{100 * v:.2f}%" if isinstance(v, float) else "-"  # noqa: E731
        ort = t.get("onnxruntime_qdq", t.get("onnxruntime"))
        print(f"| {name} | {f(t.get('fp32'))} | {f(t.get('reference'))} | {f(ort) if ort is not None else r.get('error', '-')} | "
              f"{f(c.get('top1_agreement'))} | {f(c.get('bit_exact'))} | {f(c.get('within_one_step'))} | "
              f"{c.get('max_steps', '-')} | {_twin_cell(r.get('onnxruntime_int8_weight_twin_vs_reference'))} |")


def _twin_cell(t: dict | None) -> str:
    if not t:
        return "-"
    return t["error"] if "error" in t else f"{100 * t['bit_exact']:.2f}% / {t['max_steps']}"


if __name__ == "__main__":
    main()
