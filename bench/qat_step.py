"""Time one QAT training step against one FP training step of the same model (issue 18): what a QAT run costs.

    .venv/bin/python bench/qat_step.py --model vit --bits W4A4 --batch 32

A synthetic batch (the step's cost does not depend on the pixels), one warm-up step each, then the median and the
minimum of --steps steps, the QAT net first, in this process with torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}, SHARED / "models/cifar-vit/vit_tiny_c10.pt"),
    "resnet20": ("cifar_resnet20", {}, SHARED / "models/cifar-resnet/resnet20-12fca82f.th"),
}


def _timed(step, n: int) -> tuple[float, float]:
    step()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=7)
    a = ap.parse_args()
    from plateau.models import create_model, model_cfg
    from plateau.train.qat import build_qat, qat_quant_config

    name, kw, ckpt = MODELS[a.model]
    torch.manual_seed(0)
    model = create_model(name, checkpoint=str(ckpt), **kw)
    size = model_cfg(model)["input_size"]
    x, y = torch.randn(a.batch, *size), torch.randint(0, 10, (a.batch,))
    net = build_qat(model, [torch.randn(16, *size)], qat_quant_config(a.bits, False)).train()
    model.train()
    results = {}
    for label, m, after in (("qat", net, net.after_step), ("fp", model, lambda: None)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt, after=after) -> None:
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            after()

        results[label] = _timed(step, a.steps)
    q, f = results["qat"], results["fp"]
    print(f"{a.model} {a.bits} batch {a.batch}, {torch.get_num_threads()} threads: QAT step median {q[0]:.3f} s "
          f"(min {q[1]:.3f}), FP step median {f[0]:.3f} s (min {f[1]:.3f}): {q[0] / f[0]:.2f}x")


if __name__ == "__main__":
    main()
