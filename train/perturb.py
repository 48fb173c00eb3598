"""The mechanics of one training step: the noisy forward/backward every method starts from, and SAM's ascent.

Weight noise is perturb-in-place before the forward and restore-exactly after the backward, so the optimizer
steps the clean weights with the gradient taken at the noisy point; SAM's ascent is undone the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .noise import NoiseInjector
from .qat_objectives import kd_loss

__all__ = ["StepContext", "Perturbed", "freeze_bn_stats", "noisy_backward", "sam_backward"]


@dataclass
class StepContext:
    """What a method's step works with, built once per run by the loop."""

    net: nn.Module  # runs the forward: the model, or its DistributedDataParallel wrapper under torchrun
    model: nn.Module  # the bare model, whose parameters the step reads and perturbs
    injector: NoiseInjector
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    cfg: Any  # the run's TrainConfig (config.py imports the method registry, so it is not imported here)
    step: int = 0  # the global step of the batch being trained, and the run's total (schedules read them)
    total_steps: int = 1
    # a flat run with --kd: a frozen copy of the model training started from, distilled into every step
    teacher: nn.Module | None = None


class Perturbed:
    """Save exact copies of params on entry, put them back on exit (SAM's ascent step is undone this way)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    def __enter__(self) -> Perturbed:
        self.saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)


def freeze_bn_stats(model: nn.Module, freeze: bool, saved: dict | None = None) -> dict:
    """SAM's second pass sees the same batch: momentum 0 keeps BN running stats from counting it twice."""
    saved = {} if saved is None else saved
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            if freeze:
                saved[m] = m.momentum
                m.momentum = 0.0
            elif m in saved:
                m.momentum = saved[m]
    return saved


def noisy_backward(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradients, then forward/backward under the injector's weight noise (plus --kd times the
    distillation from ctx.teacher's clean logits, where there is one); returns the detached (loss, logits)."""
    ctx.optimizer.zero_grad(set_to_none=True)
    target = None
    if ctx.teacher is not None:
        with torch.no_grad():
            target = ctx.teacher(x)
    with ctx.injector.weight_noise():
        out = ctx.net(x)
        loss = ctx.criterion(out, y)
        if target is not None:
            loss = loss + ctx.cfg.kd * kd_loss(out, target)
        loss.backward()
    return loss.detach(), out.detach()


def sam_backward(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, rho: float) -> None:
    """Replace the gradients in `.grad` by those at the worst point within radius `rho` (first-order SAM)."""
    inj = ctx.injector
    params = [p for p in ctx.model.parameters() if p.grad is not None]
    gnorm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params))
    with Perturbed(params):
        with torch.no_grad():
            for p in params:  # ascend to the worst case within radius rho
                p.add_(p.grad * (rho / (gnorm + 1e-12)))
        ctx.optimizer.zero_grad(set_to_none=True)
        saved = freeze_bn_stats(ctx.model, True)
        inj.observe = False  # the same batch again: count it once in the activation ranges too
        try:
            with inj.weight_noise():
                ctx.criterion(ctx.net(x), y).backward()
        finally:
            freeze_bn_stats(ctx.model, False, saved)
            inj.observe = True
