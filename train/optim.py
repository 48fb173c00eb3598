"""The optimizer and its learning-rate schedule: linear warm-up, then cosine to 0, stepped every batch."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["WarmupCosine", "make_optimizer", "make_scheduler"]


class WarmupCosine:
    """LR multiplier: linear warm-up then cosine to 0. A plain object, so LambdaLR saves it as numbers."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over `model`'s trainable parameters, as the TrainConfig says."""
    # No weight decay on BN/bias (1-d) parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_scheduler(
    opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of `opt` over `total_steps`, the first `warmup_steps` warming up."""
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total_steps, warmup_steps))
