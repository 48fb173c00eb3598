"""Flatness, measured: Hessian trace, top Hessian eigenvalue, and loss increase under quantization noise.

All three look at the loss on a fixed set of batches with the model in eval mode (BatchNorm on running
statistics, as it will be deployed) and, by default, with respect to the weights PTQ quantizes (Conv/Linear
weights).

    hessian_trace       Hutchinson: E[v^T H v] = tr(H) for Rademacher v; H v by double backprop
    top_eigenvalue      power iteration on H v (the eigenvalue of largest magnitude)
    noise_loss_increase Monte Carlo E[L(w + e_w; x + e_a)] - L(w; x) under the Gaussian WQE/AQE model

Second-order terms tie them together: E[dL] ~= 1/2 sum_i H_ii sigma_i^2, so a smaller trace means a smaller
expected loss increase for the same noise.

    >>> fixed = [(x, y)]                       # e.g. 512 training images, fixed seed
    >>> hessian_trace(model, fixed, n_samples=16)
    {'trace': 41.2, 'std_err': 2.3, 'n_samples': 16, 'n_params': 4640}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .noise import NoiseConfig, NoiseInjector, quant_layers

__all__ = ["hessian_trace", "top_eigenvalue", "noise_loss_increase", "quantized_weights", "measure_flatness"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def quantized_weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters flatness is measured over by default: Conv/Linear weights (what PTQ rounds)."""
    return [m.weight for _, m in quant_layers(model) if m.weight.requires_grad]


class _Hvp:
    """Hessian-vector products of the mean loss over `batches`, one first-order graph per batch kept alive."""

    def __init__(
        self, model: nn.Module, batches: Sequence[Batch], params: list[torch.Tensor], loss_fn: LossFn
    ) -> None:
        self.params = params
        n_total = sum(len(y) for _, y in batches)
        self.grads = []
        for x, y in batches:
            loss = loss_fn(model(x), y) * (len(y) / n_total)  # batch-size weighted mean over the whole set
            self.grads.append(torch.autograd.grad(loss, params, create_graph=True))

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for g in self.grads:
            hv = torch.autograd.grad(g, self.params, grad_outputs=v, retain_graph=True)
            for o, h in zip(out, hv, strict=True):
                o.add_(h.detach())
        return out


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)))


def _prepare(model: nn.Module, params: list[torch.Tensor] | None) -> tuple[bool, list[torch.Tensor]]:
    was_training = model.training
    model.eval()
    return was_training, (list(params) if params is not None else quantized_weights(model))


def hessian_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    n_samples: int = 16,
    params: list[torch.Tensor] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
) -> dict:
    """Hutchinson estimate of tr(H) of the mean loss over `batches` w.r.t. `params` (default: the quantized
    weights).

    Returns {'trace', 'std_err', 'n_samples', 'n_params'}; std_err is the Monte Carlo standard error (None for
    one sample).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    was_training, params = _prepare(model, params)
    gen = torch.Generator().manual_seed(seed)
    try:
        hvp = _Hvp(model, batches, params, loss_fn)
        est = []
        for _ in range(n_samples):
            v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]  # Rademacher
            est.append(_dot(v, hvp(v)))
    finally:
        model.train(was_training)
    mean = sum(est) / len(est)
    var = sum((e - mean) ** 2 for e in est) / max(1, len(est) - 1)
    return {
        "trace": mean,
        "std_err": math.sqrt(var / len(est)) if len(est) > 1 else None,
        "n_samples": n_samples,
        "n_params": sum(p.numel() for p in params),
    }


def top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    n_iter: int = 20,
    tol: float = 1e-3,
    params: list[torch.Tensor] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
) -> dict:
    """Power iteration on the Hessian: the eigenvalue of largest magnitude. Stops when it moves by < tol
    (relative).

    Returns {'eigenvalue', 'iterations', 'converged'}.
    """
    was_training, params = _prepare(model, params)
    gen = torch.Generator().manual_seed(seed)
    try:
        hvp = _Hvp(model, batches, params, loss_fn)
        v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
        norm = math.sqrt(_dot(v, v))
        v = [x / norm for x in v]
        eig, converged, it = 0.0, False, 0
        for it in range(1, n_iter + 1):
            hv = hvp(v)
            new = _dot(v, hv)  # Rayleigh quotient, v has unit norm
            norm = math.sqrt(_dot(hv, hv))
            if norm == 0.0:
                eig, converged = 0.0, True
                break
            v = [x / norm for x in hv]
            if it > 1 and abs(new - eig) <= tol * max(abs(new), 1e-12):
                eig, converged = new, True
                break
            eig = new
    finally:
        model.train(was_training)
    return {"eigenvalue": eig, "iterations": it, "converged": converged}


@torch.no_grad()
def _calibrate_ranges(inj: NoiseInjector, model: nn.Module, batches: Sequence[Batch]) -> None:
    """Activation ranges for the noise model from the batches themselves: plain min/max over all of them."""
    ranges: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in inj.layers:
        def hook(_m, args, name=name):
            x = args[0].detach()
            cur = torch.stack([x.min(), x.max()]).float().cpu()
            old = ranges.get(name)
            if old is not None:
                cur = torch.stack([torch.minimum(old[0], cur[0]), torch.maximum(old[1], cur[1])])
            ranges[name] = cur
        handles.append(m.register_forward_pre_hook(hook))
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    inj.act_ranges = ranges


@torch.no_grad()
def noise_loss_increase(
    model: nn.Module,
    batches: Sequence[Batch],
    noise: NoiseConfig,
    n_samples: int = 8,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
) -> dict:
    """Monte Carlo expected loss increase when the Gaussian quantization-noise model `noise` is applied.

    Activation ranges come from a min/max pass over `batches` (as PTQ calibration would). Returns
    {'base_loss', 'noisy_loss', 'increase', 'std_err', 'base_acc', 'noisy_acc', 'n_samples'}.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    was_training = model.training
    model.eval()
    inj = NoiseInjector(model, noise, torch.Generator().manual_seed(seed))

    def evaluate() -> tuple[float, float]:
        n, loss, correct = 0, 0.0, 0
        for x, y in batches:
            out = model(x)
            loss += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
        return loss / n, correct / n

    try:
        _calibrate_ranges(inj, model, batches)
        base_loss, base_acc = evaluate()
        losses, accs = [], []
        for _ in range(n_samples):
            with inj.force(), inj.weight_noise():
                loss, acc = evaluate()
            losses.append(loss)
            accs.append(acc)
    finally:
        inj.remove()
        model.train(was_training)
    mean = sum(losses) / len(losses)
    var = sum((v - mean) ** 2 for v in losses) / max(1, len(losses) - 1)
    return {
        "base_loss": base_loss,
        "noisy_loss": mean,
        "increase": mean - base_loss,
        "std_err": math.sqrt(var / len(losses)) if len(losses) > 1 else None,
        "base_acc": base_acc,
        "noisy_acc": sum(accs) / len(accs),
        "n_samples": n_samples,
    }


def measure_flatness(
    model: nn.Module,
    batches: Sequence[Batch],
    noise: NoiseConfig,
    trace_samples: int = 8,
    eig_iters: int = 10,
    mc_samples: int = 4,
    seed: int = 0,
) -> dict:
    """All three measures at once, as logged per epoch: {'hessian_trace', 'trace_std_err', 'top_eigenvalue',
    ...}.

    eig_iters=0 or mc_samples=0 skips that measure (its fields are None): the Hessian ones cost ~3 backward
    passes per sample on big models.
    """
    tr = hessian_trace(model, batches, trace_samples, seed=seed)
    eig = top_eigenvalue(model, batches, eig_iters, seed=seed) if eig_iters > 0 else {}
    mc = noise_loss_increase(model, batches, noise, mc_samples, seed=seed) if mc_samples > 0 else {}
    return {
        "hessian_trace": tr["trace"],
        "trace_std_err": tr["std_err"],
        "top_eigenvalue": eig.get("eigenvalue"),
        "eig_converged": eig.get("converged"),
        "noise_loss_increase": mc.get("increase"),
        "noise_loss_std_err": mc.get("std_err"),
        "noise_bits": noise.bits,
        "noise_alpha": noise.alpha,
        "base_loss": mc.get("base_loss"),
        "noisy_acc": mc.get("noisy_acc"),
        "base_acc": mc.get("base_acc"),
    }
