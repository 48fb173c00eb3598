"""Per-layer sensitivity and a mixed-precision choice of weight bits under a size budget.

Sensitivity of a layer at b bits: how far the model's softmax outputs move from the FP model's (their KL divergence,
mean per image) when only that layer's weights are quantized to b bits. Two measures, one registry:

    kl      (default) the KL itself, measured with a forward over the images for every layer and width: exact
            for those images; (layers x widths) forwards: 13-61 s on ResNet-20 (20 layers, 256 images, shared
            2-core machine), far longer on ViT-Tiny (74 layers)
    fisher  the second-order estimate 1/2 * sum_i F_ii * (Q_b(w)_i - w_i)^2, with F the diagonal of the model's
            Fisher information, from one backward pass per calibration image (labels drawn from the FP model's
            own softmax, so F is the Hessian of that KL at the FP weights). It leaves out F's cross terms, taking
            the rounding errors of different weights to average out. One forward and backward per image,
            whatever the number of layers and widths

On ResNet-20 (bench/RESULTS.md, "Mixed precision under a size budget") the estimate is off the measured KL by a
factor of ~1.6 per layer and width (the spread of their log ratio; the same with the exact expectation over the
classes in place of a sampled label, so it is the diagonal and the second order, not the sampling), yet the two
choices score within 0.61 points of each other at 4.5, 5 and 6 stored bits, neither ahead. The KL is the default
as the exact measure; the estimate is the option whose cost does not grow with the number of layers.

The size counted is what is stored: int8 for weights of 5-8 bits, int4 (two per byte) for 4 bits and fewer, so the
choice is between 8 bits and a low width (export measures 8 and the low width of --bits, 4 if --bits has more). The
choice is greedy: start every layer at 8 bits, then repeatedly lower the layer whose step down costs the least
sensitivity per stored bit saved, until the parameter-weighted average of stored bits is within the budget; then
the bits the last step left over go back, greedily, to the layers that gain most per bit and still fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from plateau.calibrate import calibrate, weight_scales, with_bias
from plateau.data import progress
from plateau.errors import PlateauError
from plateau.qconfig import QuantConfig
from plateau.qgraph import QGraph, QNode
from plateau.quant import dequantize, quantize
from plateau.reference import run_graph
from plateau.registry import Registry

__all__ = ["SENSITIVITIES", "layer_sensitivity", "choose_bits", "stored_bits", "mixed_precision"]

Sensitivity = dict[str, dict[int, float]]  # layer module path -> {bits: KL increase}
SENSITIVITIES: Registry[Callable[..., Sensitivity]] = Registry("sensitivity measure")


def _images(calib: list[torch.Tensor], limit: int | None) -> list[torch.Tensor]:
    """The first `limit` calibration images, in the calibration batches' order."""
    if limit is None:
        return calib
    out, n = [], 0
    for x in calib:
        if n >= limit:
            break
        out.append(x[: limit - n])
        n += len(out[-1])
    return out


def _rounded(n: QNode, bits: int, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight rounded to nearest at `bits` (integers, per-channel scales), as export first rounds it."""
    qt = cfg.weight_qtype(bits)
    s = weight_scales(n.weight, qt, cfg.weight_calibration)
    return quantize(n.weight, s, 0, qt, axis=0), s


@SENSITIVITIES.register("kl")
@torch.no_grad()
def kl_sensitivity(graph: QGraph, calib: list[torch.Tensor], cfg: QuantConfig, bits: tuple[int, ...]) -> Sensitivity:
    acts = calibrate(graph, calib, cfg)  # only the layer's bias needs them (its int32 scale)
    fp = [F.log_softmax(run_graph(graph, x), 1) for x in calib]
    images = sum(len(x) for x in calib)
    out: Sensitivity = {}
    layers = graph.weighted()
    with progress(images * len(layers) * len(bits), "sensitivity (KL)") as bar:
        for n in layers:
            out[n.module or n.name] = {}
            for b in bits:
                q, s = _rounded(n, b, cfg)
                w = {n.name: with_bias(n, q, s, cfg.weight_qtype(b), acts)}
                kl = 0.0
                for x, f in zip(calib, fp, strict=True):
                    logp = F.log_softmax(run_graph(graph, x, None, w), 1)
                    kl += F.kl_div(logp, f, log_target=True, reduction="sum").item()
                    bar.update(len(x))
                out[n.module or n.name][b] = kl / images
    return out


@SENSITIVITIES.register("fisher")
def fisher_sensitivity(graph: QGraph, calib: list[torch.Tensor], cfg: QuantConfig,
                       bits: tuple[int, ...]) -> Sensitivity:
    layers = graph.weighted()
    saved = {n.name: n.weight for n in layers}
    fisher = {n.name: torch.zeros_like(n.weight) for n in layers}
    gen = torch.Generator().manual_seed(cfg.seed)
    count = sum(len(x) for x in calib)
    try:
        for n in layers:  # a leaf copy per layer: the graph's own tensors are left as they were
            n.weight = n.weight.detach().clone().requires_grad_(True)
        with progress(count, "sensitivity (Fisher)") as bar:
            for batch in calib:
                with torch.no_grad():
                    labels = torch.multinomial(F.softmax(run_graph(graph, batch), 1), 1, generator=gen).squeeze(1)
                # Each image's own gradient, squared: the diagonal is a sum over images of g_i^2, which the batch
                # gradient does not give. One image at a time is faster here than torch.func.vmap (~6x on ViT-Tiny).
                for x, y in zip(batch.split(1), labels.split(1), strict=True):
                    grads = torch.autograd.grad(F.cross_entropy(run_graph(graph, x), y), [n.weight for n in layers])
                    for n, g in zip(layers, grads, strict=True):
                        fisher[n.name] += g.square()
                    bar.update(1)
    finally:
        for n in layers:
            n.weight = saved[n.name]
    out: Sensitivity = {}
    for n in layers:
        f = fisher[n.name] / count
        out[n.module or n.name] = {}
        for b in bits:
            q, s = _rounded(n, b, cfg)
            err = dequantize(q, s, 0, axis=0) - n.weight
            out[n.module or n.name][b] = 0.5 * float((f * err.square()).sum())
    return out


def layer_sensitivity(graph: QGraph, calib: list[torch.Tensor], cfg: QuantConfig, bits: tuple[int, ...] = (8, 4),
                      method: str = "kl", images: int | None = 256) -> Sensitivity:
    """{layer module path: {bits: KL increase}} with only that layer's weights quantized, by the measure `method`
    on the first `images` calibration images (all of them when None)."""
    measure = SENSITIVITIES.get(method)
    calib = _images(list(calib), images)
    if not calib or sum(len(x) for x in calib) == 0:
        raise PlateauError("calibration set is empty: give at least one image (--calib-images)")
    return measure(graph, calib, cfg, tuple(bits))


def stored_bits(bits: int) -> int:
    """Bits a weight of this width takes in the QDQ file and the compiled library: 4 (int4, two per byte) up to 4
    bits, else 8 (int8)."""
    return 4 if bits <= 4 else 8


def choose_bits(graph: QGraph, sens: Sensitivity, budget: float,
                pinned: dict[str, int] | None = None) -> dict[str, int]:
    """Greedy per-layer weight bits whose stored size, in bits per weight averaged over the parameters, is at most
    `budget`; returns {module path: bits}. Sizes count what is stored (stored_bits): a step down that stores no
    fewer bits (8 -> 6, 4 -> 3) saves nothing and is never taken. Layers in `pinned` ({module path: bits}: the
    widths the user fixed, e.g. --keep-first-last-8bit) keep their width and count in the budget."""
    pinned = pinned or {}
    unknown = sorted(set(pinned) - set(sens))
    if unknown:
        raise PlateauError(f"pinned width for {', '.join(map(repr, unknown))}, which is not a conv/linear layer; "
                           f"layers: {', '.join(sens)}")
    size = {n.module or n.name: n.weight.numel() for n in graph.weighted()}
    # Per layer, the widest width measured at each stored size, narrowest size first: a step between stored
    # sizes takes the widest width of the new size (8 -> 6 or 4 -> 3 would cost accuracy for no bytes). A pinned
    # layer has one level, its own width.
    levels = {k: [(stored_bits(pinned[k]), pinned[k])] if k in pinned
              else sorted({stored_bits(b): b for b in sorted(v)}.items()) for k, v in sens.items()}
    total = sum(size.values())
    smallest = sum(levels[k][0][0] * size[k] for k in size) / total
    if budget < smallest - 1e-9:
        why = (f"the layers with a fixed width ({', '.join(f'{k}: {b}' for k, b in pinned.items())}) and int4 for "
               "the rest" if pinned else "the smallest stored width (4-bit and narrower weights are stored as int4)")
        raise PlateauError(f"weight-bit budget {budget} is below {smallest:.4g} bits per weight, {why}")
    at = {k: len(lv) - 1 for k, lv in levels.items()}  # every layer starts at its widest

    def avg() -> float:
        return sum(levels[k][at[k]][0] * size[k] for k in size) / total

    def step_cost(k: str, to: int) -> tuple[float, int]:
        """(sensitivity added, stored bits added) moving layer k to level `to`."""
        (s_from, b_from), (s_to, b_to) = levels[k][at[k]], levels[k][to]
        return sens[k][b_to] - sens[k][b_from], (s_to - s_from) * size[k]

    def best_step(direction: int) -> str | None:
        """The layer whose step to its next level down (-1) or up (+1, within the budget, and only for a gain) has
        the least sensitivity added per stored bit moved; the first in graph order on a tie."""
        best, best_rate, now = None, (0.0 if direction > 0 else float("inf")), avg()
        for k, lv in levels.items():
            to = at[k] + direction
            if not 0 <= to < len(lv):
                continue
            loss, bits = step_cost(k, to)
            if direction > 0 and now + bits / total > budget + 1e-9:
                continue
            if loss / abs(bits) < best_rate:
                best, best_rate = k, loss / abs(bits)
        return best

    while avg() > budget + 1e-9 and (k := best_step(-1)) is not None:
        at[k] -= 1
    # The last step down can overshoot: give the bits left over back to the layers that gain most per bit.
    while (k := best_step(+1)) is not None:
        at[k] += 1
    return {k: levels[k][at[k]][1] for k in levels}


def mixed_precision(graph: QGraph, calib: list[torch.Tensor], cfg: QuantConfig, budget: float, method: str = "kl",
                    images: int = 256) -> dict:
    """Measure every layer at 8 bits and at the low width of cfg (at most 4: the widths that store differently),
    choose under `budget` stored bits per weight, and return the choice as export records it: layer_bits (which
    cfg.layer_bits is then set to), the averages, the measure's name, images and seconds, the per-layer table.
    Widths the user fixed (cfg.layer_bits, --keep-first-last-8bit) are kept and counted."""
    t0 = time.time()
    layers = graph.weighted()
    # layer_bits may name a layer by module path or by graph node name (as weight_bits() reads it): choose_bits
    # keys layers by module path; a name that is neither is refused there, naming it
    path = {n.name: n.module or n.name for n in layers}
    pinned = {path.get(k, k): b for k, b in cfg.layer_bits.items()}
    if cfg.keep_first_last_8bit:
        pinned.update({n.module or n.name: 8 for n in (layers[0], layers[-1])})
    widths = (8, min(cfg.weight_bits, 4))
    # Refuse a budget or pin that cannot work before the measurement, which takes minutes on a transformer.
    choose_bits(graph, {n.module or n.name: dict.fromkeys(widths, 0.0) for n in layers}, budget, pinned)
    sens = layer_sensitivity(graph, calib, cfg, bits=widths, method=method, images=images)
    bits = choose_bits(graph, sens, budget, pinned)
    size = {n.module or n.name: n.weight.numel() for n in layers}
    total = sum(size.values())
    return {"budget_avg_bits": budget, "sensitivity_measure": method,
            "sensitivity_images": min(images, sum(len(x) for x in calib)),
            "sensitivity_seconds": round(time.time() - t0, 1),
            "avg_stored_bits": sum(stored_bits(bits[k]) * n for k, n in size.items()) / total,
            "avg_weight_bits": sum(bits[k] * n for k, n in size.items()) / total,
            "pinned": pinned, "layer_bits": bits, "sensitivity": sens}
