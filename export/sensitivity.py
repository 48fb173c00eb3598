"""Per-layer sensitivity and a mixed-precision choice of weight bits under a size budget.

Sensitivity of a layer at b bits: the increase of the calibration loss (KL divergence of the softmax outputs from
the FP model's) when only that layer's weights are quantized to b bits. The choice is greedy: start every layer at
the highest width, then repeatedly lower the layer whose next step down costs the least sensitivity per weight bit
saved, until the parameter-weighted average of weight bits is within the budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plateau.calibrate import calibrate, weight_scales, with_bias
from plateau.errors import PlateauError
from plateau.qconfig import QuantConfig
from plateau.qgraph import QGraph
from plateau.quant import quantize
from plateau.reference import run_graph

__all__ = ["layer_sensitivity", "choose_bits"]


@torch.no_grad()
def layer_sensitivity(graph: QGraph, calib: list[torch.Tensor], cfg: QuantConfig,
                      bits: tuple[int, ...] = (8, 6, 4, 3)) -> dict[str, dict[int, float]]:
    """{layer module path: {bits: loss increase}} with only that layer's weights quantized."""
    acts = calibrate(graph, calib, cfg)
    fp = [F.log_softmax(run_graph(graph, x), 1) for x in calib]
    out: dict[str, dict[int, float]] = {}
    for n in graph.weighted():
        out[n.module or n.name] = {}
        for b in bits:
            qt = cfg.weight_qtype(b)
            s = weight_scales(n.weight, qt, cfg.weight_calibration)
            w = {n.name: with_bias(n, quantize(n.weight, s, 0, qt, axis=0), s, qt, acts)}
            kl = sum(F.kl_div(F.log_softmax(run_graph(graph, x, None, w), 1), f, log_target=True,
                              reduction="batchmean").item() for x, f in zip(calib, fp, strict=True))
            out[n.module or n.name][b] = kl / len(calib)
    return out


def choose_bits(graph: QGraph, sens: dict[str, dict[int, float]], budget: float) -> dict[str, int]:
    """Greedy per-layer weight bits with parameter-weighted average <= budget; returns {module path: bits}."""
    size = {n.module or n.name: n.weight.numel() for n in graph.weighted()}
    options = {k: sorted(v, reverse=True) for k, v in sens.items()}
    if budget < min(min(o) for o in options.values()):
        raise PlateauError(f"weight-bit budget {budget} is below the smallest width tried")
    choice = {k: o[0] for k, o in options.items()}
    total = sum(size.values())

    def avg() -> float:
        return sum(choice[k] * size[k] for k in size) / total

    while avg() > budget + 1e-9:
        best, best_cost = None, float("inf")
        for k, o in options.items():
            i = o.index(choice[k])
            if i + 1 >= len(o):
                continue
            nb = o[i + 1]
            cost = (sens[k][nb] - sens[k][choice[k]]) / ((choice[k] - nb) * size[k])
            if cost < best_cost:
                best, best_cost = (k, nb), cost
        if best is None:
            break
        choice[best[0]] = best[1]
    return choice
