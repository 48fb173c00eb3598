"""QAT benchmark (issue 18): `plateau train --qat` with each objective, against the FP model fine-tuned with the
same budget, over seeds; every row its own `plateau train` process (the real CLI).

    .venv/bin/python bench/qat.py --model resnet20 [--rows FP,W4A4:lsq,...] [--seeds 0,1,2] [--images N --epochs E]
    .venv/bin/python bench/qat.py --model vit --rows FP,W4A4:lsq --seeds 0
    .venv/bin/python bench/qat.py --model resnet20 --table        # the markdown table of what is stored

A row is `FP` (method none, the fine-tuned FP reference), `BITS:METHOD` (the defaults) or `BITS:METHOD:frozen`
(BatchNorm frozen into the folded form from the first step). Every row trains the same number of
images (--epochs x --images of the train split, batch 128) from the same pretrained checkpoint; QAT rows keep the
first and last layer at 8 bits. The top-1 reported for a QAT row is the exported reference's (integer forward, what
the device computes) on the full 10,000-image test split. Results go to bench/results/qat_<model>.json, row by row
(a killed benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

MODELS = {
    "resnet20": ["--model", "cifar_resnet20", "--checkpoint",
                 str(SHARED / "models/cifar-resnet/resnet20-12fca82f.th")],
    "vit": ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--checkpoint",
            str(SHARED / "models/cifar-vit/vit_tiny_c10.pt")],
}
DEFAULT_ROWS = ["FP", "W4A4:lsq", "W3A3:lsq", "W2A2:lsq", *(f"{b}:{m}" for b in ("W2A2", "W3A3")
                                                            for m in ("fpq", "cr", "mec", "ti"))]


def _cpu() -> str:
    """The CPU's name and its widest integer dot-product features ("AMD EPYC" alone names Zen 2 and Zen 4 alike)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    feats = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(feats) or 'no AVX2'})"


def run_row(model: str, row: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one row in its own process; its report's figures."""
    name = f"{row.replace(':', '-')}-s{seed}"
    run = ROOT / "runs" / f"bench-qat-{model}" / name
    argv = [sys.executable, "-m", "plateau", "train", "--run", str(run), *MODELS[model], "--data", args.data,
            "--epochs", str(args.epochs), "--train-limit", str(args.images), "--seed", str(seed), "--overwrite",
            "--flatness", "off", "--no-progress", "--batch-size", "128"]
    if row == "FP":
        argv += ["--method", "none", "--no-quant-gap"]
    else:
        bits, method, *variant = row.split(":")
        argv += ["--qat", "--bits", bits, "--method", method, "--keep-first-last-8bit"]
        if variant == ["frozen"]:  # BatchNorm folded and frozen from the first step (and its learning rate)
            argv += ["--qat-bn-freeze", "0"]
    t0 = time.time()
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return {"row": row, "seed": seed, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    rep = json.loads((run / "train" / "report.json").read_text())
    g = rep["quant_gap"]
    out = {"row": row, "seed": seed, "seconds": round(time.time() - t0, 1),
           "train_images": args.images * args.epochs, "lr": rep["config"]["lr"]}
    if row == "FP":
        out.update(top1=rep["fp_top1"])
    else:
        out.update(top1=g["reference_top1"], fake_quant_top1=g["fake_quant_top1"], start_fp_top1=g["fp_top1"])
    return out


def table(results: dict) -> str:
    rows: dict[str, list[dict]] = {}
    for r in results["rows"]:
        rows.setdefault(r["row"], []).append(r)
    fp = [r["top1"] for r in rows.get("FP", []) if "top1" in r]
    fp_mean = statistics.mean(fp) if fp else None
    lines = ["| row | seeds | top-1 mean | spread (min-max) | vs FP fine-tuned | training forward | s/run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in rows.items():
        ok = [r for r in rs if "top1" in r]
        if not ok:
            lines.append(f"| {name} | 0 | failed: {rs[0].get('error', '?')[:80]} | | | | |")
            continue
        t = [r["top1"] for r in ok]
        m = statistics.mean(t)
        vs = f"{m - fp_mean:+.2f}" if fp_mean is not None and name != "FP" else ""
        fq = (f"{statistics.mean(r['fake_quant_top1'] for r in ok):.2f}" if "fake_quant_top1" in ok[0] else "")
        lines.append(f"| {name} | {len(ok)} | {m:.2f} | {min(t):.2f}-{max(t):.2f} | {vs} | {fq} | "
                     f"{statistics.mean(r['seconds'] for r in ok):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--images", type=int, default=10000, help="train images per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", default=str(SHARED / "data/cifar10"))
    ap.add_argument("--table", action="store_true", help="print the stored results as a markdown table")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / f"qat_{args.model}.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if args.table:
        print(table(results))
        return
    # rows from other sessions may come from another CPU: each row names its own (older files named one for all)
    for r in results["rows"]:
        r.setdefault("cpu", results.get("machine", {}).get("cpu"))
    results.pop("machine", None)
    results.update(budget={"epochs": args.epochs, "images_per_epoch": args.images, "batch": 128})
    done = {(r["row"], r["seed"], r.get("train_images")) for r in results["rows"] if "top1" in r}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for row in args.rows.split(","):
            if (row, seed, args.images * args.epochs) in done:
                continue
            r = run_row(args.model, row, seed, args)
            r.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu=_cpu(), cores=os.cpu_count())
            results["rows"] = [x for x in results["rows"] if (x["row"], x["seed"]) != (row, seed)] + [r]
            path.write_text(json.dumps(results, indent=1))
            print(json.dumps(r), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
