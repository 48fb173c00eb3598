"""Does flat (noise-injected) fine-tuning make PTQ cheaper?  The train stage's "must show".

Recipe: the pretrained CIFAR ResNet-20 (81.0% on the JPEG CIFAR-10 test set) is fine-tuned for the same short
budget with each method and seed, then every model goes through the same PTQ (export's reference quantizer,
min/max calibration on 512 train images) at W8A8, W4A8 and W4A4. Reported: FP and PTQ top-1 on the same test images,
and the Hessian trace on the same 256 train images.

    python bench/train_flatness.py                         # ~30-40 min on 2 busy cores
    python bench/train_flatness.py --methods none gaussian sam-gaussian --seeds 0 1 --epochs 2 --train-limit 5000
    python bench/train_flatness.py --methods none gaussian gaussian@0.5 ramp   # METHOD@ALPHA sets that row's alpha

Runs go seed by seed (every method at seed 0, then seed 1, ...), so a stopped run still compares like with like.

Writes bench/results/train_flatness.json (after every run, so a partial run keeps what it measured) and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from plateau.data import batches, load_split
from plateau.models import create_model
from plateau.train import TrainConfig, hessian_trace, train

ROOT = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/cifar10")
CKPT = Path("/work/shared/models/cifar-resnet/resnet20-12fca82f.th")
BITS = ("W8A8", "W4A8", "W4A4")


def _quantizer():
    """The export stage's quantizer (round to nearest unless the config says otherwise)."""
    from plateau.export import QuantConfig, quantize_model

    return QuantConfig, quantize_model, "plateau.export"


@torch.no_grad()
def _top1(model, data, mean, std, limit) -> float:
    if isinstance(model, torch.nn.Module):
        model.eval()
    c = n = 0
    if limit is not None and limit < len(data):  # a fixed random subset: ImageFolder order is sorted by class
        data = data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[:limit]))
    for x, y in batches(data, 500, mean, std):
        c += int((model(x).argmax(1) == y).sum())
        n += len(y)
    return 100.0 * c / n


def _fixed(data, n, mean, std, seed=0):
    idx = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return list(batches(data.subset(idx), 256, mean, std))


def evaluate(model, train_set, test_set, args) -> dict:
    """FP and PTQ top-1 at each bit width, and the Hessian trace, all on fixed data shared by every run."""
    QuantConfig, quantize_model, _ = _quantizer()
    cfg = model.plateau_cfg
    mean, std = cfg["mean"], cfg["std"]
    res = {"fp_top1": _top1(model, test_set, mean, std, args.eval_limit)}
    calib = [x for x, _ in _fixed(train_set, 512, mean, std, seed=1)]
    for bits in BITS:
        q = quantize_model(copy.deepcopy(model).eval(), calib, QuantConfig.from_bits(bits))
        # simulate(): the float fake-quant path, equal to the integer-exact forward up to rare rounding ties and
        # ~10x faster on CPU; --exact uses the integer forward.
        fwd = q if args.exact or not hasattr(q, "simulate") else q.simulate
        res[bits] = _top1(fwd, test_set, mean, std, args.eval_limit)
    t = hessian_trace(model, _fixed(train_set, args.flat_images, mean, std), args.trace_samples)
    res["hessian_trace"], res["trace_std_err"] = t["trace"], t["std_err"]
    return res


def _table(results: dict) -> str:
    rows = ["| method | seeds | FP top-1 | W8A8 | W4A8 | W4A4 | Hessian trace |", "|---|---:|---:|---:|---:|---:|---:|"]
    def cell(v: dict, spec: str = ".2f") -> str:
        return f"{v['mean']:{spec}}" + (f" ± {v['sd']:{spec}}" if v["n"] > 1 else "")

    for method, s in results["summary"].items():
        rows.append(f"| {method} | {s['n']} | {cell(s['fp_top1'])} | {cell(s['W8A8'])} | {cell(s['W4A8'])} | "
                    f"{cell(s['W4A4'])} | {cell(s['hessian_trace'], '.0f')} |")
    return "\n".join(rows)


def _summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    summary = {}
    for method, rs in out.items():
        s = {"n": len(rs)}
        for k in ("fp_top1", *BITS, "hessian_trace"):
            vals = [r[k] for r in rs]
            s[k] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals)}
        summary[method] = s
    return summary


def _write(results: dict, out: Path) -> None:
    results["summary"] = _summarize(results["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_flatness.json").write_text(json.dumps(results, indent=2) + "\n")
    a = results["args"]
    md = [
        "# Flat fine-tuning vs PTQ: CIFAR ResNet-20 on JPEG CIFAR-10",
        "",
        f"Fine-tuning from the pretrained checkpoint: {a['epochs']} epoch(s) x {a['train_limit']} train images, "
        f"SGD lr {a['lr']} cosine, batch {a['batch_size']}; noise at {a['bits']} (alpha {a['alpha']} unless the row "
        "names one, weights+activations); BN statistics re-estimated "
        f"without noise on {a.get('bn_recalibrate', 0)} train images after training, for every row. "
        f"PTQ top-1 via the reference's {'integer-exact forward' if a['exact'] else 'float fake-quant simulate()'}. "
        f"Top-1 on a fixed random {a['eval_limit']} of the 10,000 test images; PTQ = {results['quantizer']} "
        "(min/max, 512 train images); "
        f"Hessian trace: Hutchinson, {a['trace_samples']} Rademacher vectors, {a['flat_images']} fixed train images, "
        "Conv/Linear weights, eval mode. Mean ± sd over seeds; 'pretrained' is the checkpoint as it is.",
        "",
        _table(results),
        "",
        f"Measured on {results['host']}; wall time {results.get('wall_s', 0):.0f} s.",
        "",
    ]
    (out / "train_flatness.md").write_text("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["none", "gaussian"], help="METHOD or METHOD@ALPHA")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--flat-images", type=int, default=256)
    p.add_argument("--trace-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bn-recalibrate", type=int, default=TrainConfig.bn_recalibrate,
                   help="train images re-estimating BN statistics without noise after training (0: off)")
    p.add_argument("--exact", action="store_true", help="PTQ top-1 with the integer-exact forward (slow)")
    p.add_argument("--runs", default="runs/bench-train-flatness")
    p.add_argument("--out", default=str(ROOT / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train_set, test_set = load_split(DATA, "train"), load_split(DATA, "test")
    import platform

    host = f"{platform.processor() or platform.machine()}, {args.threads} torch threads"
    results = {"args": vars(args), "quantizer": _quantizer()[2], "host": host, "runs": []}
    out = Path(args.out)

    model = create_model("cifar_resnet20", checkpoint=CKPT)
    results["runs"].append({"method": "pretrained", "seed": 0, **evaluate(model, train_set, test_set, args)})
    print("pretrained:", results["runs"][-1], flush=True)
    _write(results, out)
    for seed in args.seeds:
        for spec in args.methods:
            method, _, alpha = spec.partition("@")
            torch.manual_seed(seed)
            model = create_model("cifar_resnet20", checkpoint=CKPT)
            cfg = TrainConfig(data=str(DATA), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              warmup_epochs=0, bits=args.bits, method=method, alpha=float(alpha or args.alpha),
                              rho=args.rho, seed=seed, flatness="off", train_limit=args.train_limit,
                              eval_limit=args.eval_limit, quant_gap=False, progress=False, threads=args.threads,
                              bn_recalibrate=args.bn_recalibrate)
            t = time.time()
            rep = train(model, cfg, Path(args.runs) / f"{spec}-s{seed}", train_set, test_set)
            r = {"method": spec, "seed": seed, "alpha": cfg.alpha, "train_s": round(time.time() - t, 1),
                 "train_acc": rep["final"]["train_acc"], **evaluate(model, train_set, test_set, args)}
            results["runs"].append(r)
            results["wall_s"] = time.time() - t0
            print(f"{spec} seed {seed}:", r, flush=True)
            _write(results, out)
    results["wall_s"] = time.time() - t0
    _write(results, out)
    print(_table(results))


if __name__ == "__main__":
    main()
