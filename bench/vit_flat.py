"""Issue 16 benchmark: flat fine-tuning of the shared CIFAR ViT-Tiny against plain fine-tuning, then PTQ.

For each seed and method: fine-tune the pretrained ViT (`plateau.train.train`, same budget for every row), then
measure FP top-1, the Hessian trace (Hutchinson, attention unfused) and PTQ top-1 at W4A4 and W3A3 of the result
(round-to-nearest PTQ, the same for every row; the integer reference `FakeQuantModel.forward`), once with MSE
ranges (`ptq_<bits>`) and once with min-max ranges (`ptq_<bits>_minmax`), the attention probabilities on export's
8-bit grid in both; `--ptq-ranges readme` adds min-max with the probabilities at the activation width too
(`ptq_<bits>_readme`: the model README's simple PTQ, where the issue's +15 / +3 goals were measured).
Rows: `none` (plain fine-tuning) and `METHOD@BITS` (a registered noise method, e.g. `gaussian@W3A3`: Gaussian
WQE/AQE at BITS, attention operands included). Options follow `+`: `+kd=W` adds W times the distillation from the
pretrained model to every step (`alternate@W3A3+kd=1`); `+range` turns on `--range-grad`; `+probs` puts the noise on
the attention probabilities at the activation width of BITS instead of 8 bits, as the `readme` PTQ quantizes them.
A row whose run directory already holds the finished fine-tune is measured again without training, and one killed
part-way continues from its newest checkpoint (`--retrain` trains it anew).

    .venv/bin/python bench/vit_flat.py --device cuda --seeds 0 1 2 --out bench/results/vit_flat.json
    .venv/bin/python bench/vit_flat.py --train-limit 1024 --eval-limit 500 --epochs 1 --seeds 0   # a CPU-sized run

Writes the JSON (every run) and prints a Markdown table (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "data/cifar10"))
    p.add_argument("--ckpt", default=str(SHARED / "models/cifar-vit/vit_tiny_c10.pt"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["none", "gaussian@W4A4", "gaussian@W3A3"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=25000)
    p.add_argument("--eval-limit", type=int, default=None, help="test images (default: all 10000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--noise-p", type=float, default=0.5, help="fraction of elements perturbed (quantnoise rows)")
    p.add_argument("--retrain", action="store_true", help="train rows whose finished run exists again")
    p.add_argument("--trace-samples", type=int, default=8)
    p.add_argument("--flat-images", type=int, default=512, help="train images of the Hessian trace (memory grows "
                                                               "with them: the double-backward graphs stay alive)")
    p.add_argument("--ptq-bits", nargs="+", default=["W4A4", "W3A3"])
    p.add_argument("--ptq-ranges", nargs="+", default=["mse", "minmax"], choices=("mse", "minmax", "readme"))
    p.add_argument("--pretrained-from", default=None, help="take the pretrained row from this earlier result JSON "
                   "(same checkpoint, test images and PTQ settings) instead of measuring it again")
    p.add_argument("--runs", default=str(ROOT / "runs/bench-vit-flat"))
    p.add_argument("--out", default=str(ROOT / "bench/results/vit_flat.json"))
    return p.parse_args()


def _model(ckpt: str):
    from plateau.models import create_model

    return create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, checkpoint=ckpt)


@torch.no_grad()
def _top1(fn, xs: list[torch.Tensor], y: torch.Tensor) -> float:
    out = torch.cat([fn(x).float().cpu() for x in xs])
    return 100.0 * float((out.argmax(1) == y).float().mean())


def measure(model, train_set, xs, y, args, device) -> dict:
    """FP top-1, Hessian trace and PTQ top-1 at each of args.ptq_bits."""
    from plateau.calibrate import quantize_nearest
    from plateau.capture import unfused_attention
    from plateau.qconfig import QuantConfig
    from plateau.train.evaluate import fixed_batches, on_device
    from plateau.train.flatness import hessian_trace

    mean, std = model.plateau_cfg["mean"], model.plateau_cfg["std"]
    model = model.to(device).eval()
    out = {"fp_top1": _top1(model, xs, y)}
    if args.trace_samples:  # 0: PTQ columns only (the trace's double backward is most of a row's time and memory)
        fixed = list(on_device(fixed_batches(train_set, args.flat_images, mean, std, bs=128), device))
        with unfused_attention(model):
            out["hessian_trace"] = hessian_trace(model, fixed, n_samples=args.trace_samples)["trace"]
    calib = [x for x, _ in fixed_batches(train_set, 512, mean, std)]
    for bits in args.ptq_bits:  # quantized on the CPU, evaluated where the model is
        for ranges in args.ptq_ranges:
            if ranges == "readme":  # min-max, and the probabilities at the activation width like the rest
                cfg = QuantConfig.from_bits(bits, act_calibration="minmax", weight_calibration="minmax")
                cfg.probability_bits = cfg.act_bits
            else:
                cfg = QuantConfig.from_bits(bits, act_calibration=ranges, weight_calibration=ranges)
            ref = quantize_nearest(model, calib, cfg).to_device(device)
            out[_ptq_key(bits, ranges)] = _top1(ref, xs, y)
    return out


def _ptq_key(bits: str, ranges: str) -> str:
    return f"ptq_{bits}" if ranges == "mse" else f"ptq_{bits}_{ranges}"


def main() -> None:
    args = _args()
    from plateau.data import batches, load_split
    from plateau.quant import parse_bits
    from plateau.train import TrainConfig, train
    from plateau.train.checkpoint import resume_candidates

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    train_set, test_set = load_split(args.data, "train"), load_split(args.data, "test")
    if args.eval_limit:
        test_set = test_set.subset(np.sort(np.random.default_rng(0).permutation(len(test_set))[:args.eval_limit]))
    mean, std = [0.5] * 3, [0.5] * 3
    xs = [x.to(device) for x, _ in batches(test_set, 500, mean, std)]
    y = torch.as_tensor(test_set.labels)
    results = {"args": vars(args), "host": platform.node(), "device": torch.cuda.get_device_name(0)
               if args.device == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()), "runs": []}
    t0 = time.time()
    results["pretrained"] = _pretrained(args) or measure(_model(args.ckpt), train_set, xs, y, args, device)
    print("pretrained", results["pretrained"], flush=True)
    for seed in args.seeds:
        for spec in args.methods:
            body, *opts = spec.split("+")
            kd = next((o.partition("=")[2] for o in opts if o.startswith("kd=")), "")
            if any(o not in ("range", "probs") and not o.startswith("kd=") for o in opts):
                raise SystemExit(f"{spec}: a row's options are +kd=W, +range and +probs")
            method, _, bits = body.partition("@")
            prob_bits = parse_bits(bits or "W8A8")[1] if "probs" in opts else 8
            torch.manual_seed(seed)
            model = _model(args.ckpt)
            cfg = TrainConfig(data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              optimizer="adamw", weight_decay=0.05, warmup_epochs=0.0, label_smoothing=0.1,
                              bits=bits or "W8A8", method=method, alpha=args.alpha, noise_p=args.noise_p,
                              kd=float(kd or 0), range_grad="range" in opts, probability_bits=prob_bits,
                              seed=seed, flatness="off",
                              train_limit=args.train_limit, eval_limit=args.eval_limit, quant_gap=False,
                              bn_recalibrate=0, device=args.device, progress=False)
            run = Path(args.runs) / f"{spec}-s{seed}"
            # a row with a checkpoint continues from it (the trainer's resume): a finished one is measured again,
            # a killed one trains its remaining epochs; --retrain starts it over (the trainer's overwrite)
            started = bool(resume_candidates(run / "train"))
            cfg.resume, cfg.overwrite = started and not args.retrain, started and args.retrain
            train(model, cfg, run, train_set, test_set)
            r = {"method": spec, "seed": seed, "train_s": _train_seconds(run / "train"),
                 **measure(model, train_set, xs, y, args, device)}
            results["runs"].append(r)
            print(r, flush=True)
            results["wall_s"] = round(time.time() - t0, 1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


def _pretrained(args: argparse.Namespace) -> dict | None:
    """The pretrained row of --pretrained-from, refused (SystemExit) unless it was measured the same way."""
    if not args.pretrained_from:
        return None
    old = json.loads(Path(args.pretrained_from).read_text())
    same = ("ckpt", "eval_limit", "ptq_bits", "ptq_ranges", "trace_samples", "flat_images")
    diff = [k for k in same if old["args"].get(k) != vars(args)[k]]
    if diff:
        raise SystemExit(f"--pretrained-from {args.pretrained_from}: measured with other {', '.join(diff)}")
    return {**old["pretrained"], "from": args.pretrained_from}


def _train_seconds(train_dir: Path) -> float:
    """The fine-tune's training seconds, summed over the epochs metrics.jsonl records (the last record of each; a
    resumed run's epochs from before the kill included, except one killed between its checkpoint and its line)."""
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_epoch = {r["epoch"]: r["epoch_time_s"] for r in rows if "epoch_time_s" in r}
    return round(sum(per_epoch.values()), 1)


def table(results: dict) -> str:
    ranges = results["args"].get("ptq_ranges", ["mse"])
    keys = ["fp_top1", *[_ptq_key(b, r) for r in ranges for b in results["args"]["ptq_bits"]], "hessian_trace"]
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    p = results["pretrained"]
    lines.append("| pretrained | - | " + " | ".join(f"{p[k]:.2f}" if k in p else "-" for k in keys) + " |")
    for spec in results["args"]["methods"]:
        rows = [r for r in results["runs"] if r["method"] == spec]
        if not rows:
            continue
        cells = []
        for k in keys:
            v = [r[k] for r in rows if k in r]
            if not v:
                cells.append("-")
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f}")
        lines.append(f"| {spec} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
