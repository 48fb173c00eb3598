"""Evaluation on the test split, and the fixed train subset that flatness and calibration use."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plateau.data import ImageSet, batches

from .distributed import all_sum

__all__ = ["FLATNESS_SEED", "evaluate", "fixed_batches", "device_of", "on_device"]

FLATNESS_SEED = 0  # the flatness and evaluation subsets are the same for every run, so runs compare


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (its batches go there)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean: list[float], std: list[float], bs: int, rank: int,
             world: int, limit: int | None) -> dict:
    """{'loss', 'top1', 'n'} of `model` in eval mode on `data` (a fixed random `limit` of its images), over
    all ranks."""
    was = model.training
    model.eval()
    if limit is not None and limit < len(data):  # a fixed random subset: ImageFolder order is sorted by class
        data = data.subset(np.sort(np.random.default_rng(FLATNESS_SEED).permutation(len(data))[:limit]))
    t = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    dev = device_of(model)
    for x, y in batches(data, bs, mean, std, rank=rank, world_size=world):
        x, y = x.to(dev), y.to(dev)
        out = model(x)
        t += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")), float((out.argmax(1) == y).sum()),
                           len(y)], dtype=torch.float64)
    model.train(was)
    t = all_sum(t, world)
    return {"loss": float(t[0] / t[2]), "top1": float(100.0 * t[1] / t[2]), "n": int(t[2])}


def fixed_batches(data: ImageSet, n: int, mean: list[float], std: list[float], bs: int = 256) -> list:
    """A fixed, seed-independent subset of the train split (no augmentation): flatness and calibration
    data."""
    idx = np.random.default_rng(FLATNESS_SEED).permutation(len(data))[: min(n, len(data))]
    return list(batches(data.subset(np.sort(idx)), bs, mean, std))


def on_device(data, device: torch.device):
    """(x, y) batches moved to `device` (a no-op on the CPU)."""
    for x, y in data:
        yield x.to(device), y.to(device)
