"""BatchNorm recalibration: clean running statistics after noisy training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .noise import NoiseInjector

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inj: NoiseInjector | None, data: Iterable) -> int:
    """Re-estimate every BatchNorm's running mean and variance from clean forwards (no noise) over `data`.

    Training with activation noise leaves the running statistics of noisy activations (the variance inflated
    by the noise); evaluation and PTQ (which folds BN into the conv) see clean ones. Returns the images used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = {m: m.momentum for m in bns}
    was, enabled, observe = model.training, inj.enabled if inj else None, inj.observe if inj else None
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    if inj is not None:
        inj.enabled, inj.observe = False, False
    model.train()
    n = 0
    try:
        for x, _ in data:
            model(x)
            n += len(x)
    finally:
        for m in bns:
            m.momentum = saved[m]
        if inj is not None:
            inj.enabled, inj.observe = enabled, observe
        model.train(was)
    return n
