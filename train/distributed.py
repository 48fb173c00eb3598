"""Data-parallel helpers: under torchrun (WORLD_SIZE > 1) a process group (gloo on CPUs, NCCL on GPUs, one GPU per
process); otherwise no-ops."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .noise import NoiseInjector

__all__ = ["setup_distributed", "all_sum", "sync_ranges"]


def setup_distributed(device: str = "cpu") -> tuple[int, int, bool]:
    """(rank, world_size, we_initialized). Under torchrun (WORLD_SIZE > 1) start a gloo group (CPU) or an NCCL one
    with this process on GPU LOCAL_RANK (cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `t` over the ranks in place (a no-op in one process); NCCL sums on the GPU and hands back."""
    if world > 1:
        if dist.get_backend() == "nccl":
            g = t.cuda()
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            t.copy_(g.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sync_ranges(inj: NoiseInjector, world: int) -> None:
    """Average the activation-range EMAs over ranks: every rank (and the checkpoint) holds the same ones."""
    if world <= 1 or not inj.act_ranges:
        return
    keys = sorted(inj.act_ranges)
    t = all_sum(torch.stack([inj.act_ranges[k] for k in keys]) / world, world)
    inj.act_ranges = {k: t[i].clone() for i, k in enumerate(keys)}
