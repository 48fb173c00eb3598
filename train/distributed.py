"""Data-parallel helpers: under torchrun (WORLD_SIZE > 1) a gloo process group on CPU; otherwise no-ops."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .noise import NoiseInjector

__all__ = ["setup_distributed", "all_sum", "sync_ranges"]


def setup_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, we_initialized). Under torchrun (WORLD_SIZE > 1) start a gloo group: CPU only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `t` over the ranks in place (a no-op in one process)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_ranges(inj: NoiseInjector, world: int) -> None:
    """Average the activation-range EMAs over ranks: every rank (and the checkpoint) holds the same ones."""
    if world <= 1 or not inj.act_ranges:
        return
    keys = sorted(inj.act_ranges)
    t = torch.stack([inj.act_ranges[k] for k in keys]) / world
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    inj.act_ranges = {k: t[i].clone() for i, k in enumerate(keys)}
