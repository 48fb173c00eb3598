"""Checkpoints: written atomically every epoch, read back to resume a run exactly where it stopped.

A checkpoint holds plain types only (loadable with `torch.load(..., weights_only=True)`): the model's state
dict (unwrapped), what export needs to rebuild the model, the config, and the optimizer, schedule, noise and
RNG states. The config it holds wins on resume, so a resumed run continues the schedule and noise it started
with.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plateau.artifacts import atomic_path, write_text
from plateau.errors import PlateauError

from .config import TrainConfig
from .noise import NoiseInjector

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "load_checkpoint",
    "resume_config",
    "restore_checkpoint",
    "prepare_run_dir",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "plateau.train.checkpoint"
CHECKPOINT_VERSION = 1


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`; a PlateauError unless it is a readable Plateau checkpoint of this version."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = f"{path} is not a readable checkpoint ({type(e).__name__})"
        raise PlateauError(f"cannot resume: {reason}") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise PlateauError(f"cannot resume: {path} is not a plateau training checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise PlateauError(f"cannot resume: {path} has checkpoint version {blob.get('version')}, "
                           f"expected {CHECKPOINT_VERSION}")
    return blob


def resume_config(
    cfg: TrainConfig, out_dir: Path, model_name: str, is_main: bool
) -> tuple[TrainConfig, dict | None]:
    """(the config to run with, the checkpoint to continue from or None). Only with `cfg.resume` and a
    last.pt: then the saved config wins, except for the settings that do not change the numbers."""
    last = out_dir / "last.pt"
    if not cfg.resume:
        return cfg, None
    if not last.is_file():
        if is_main:
            print(f"resume: no {last} yet, starting from the beginning")
        return cfg, None
    blob = load_checkpoint(last)
    if blob["model_name"] != model_name:
        raise PlateauError(f"cannot resume: {last} holds model {blob['model_name']!r}, not {model_name!r}")
    saved = TrainConfig.from_dict(blob["config"])
    keep = {"resume": True, "threads": cfg.threads, "progress": cfg.progress}
    changed = [f.name for f in fields(cfg)
               if f.name not in keep and getattr(cfg, f.name) != getattr(saved, f.name)]
    if changed and is_main:
        print(f"resume: using the checkpoint's settings for {', '.join(changed)}")
    return TrainConfig(**{**saved.to_dict(), **keep}), blob


def restore_checkpoint(blob: dict, model: nn.Module, opt: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LRScheduler, inj: NoiseInjector) -> tuple[int, list]:
    """Load the states of `blob` into the run's objects; (the epoch it ended, the history so far)."""
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    inj.load_state_dict(blob["noise"])
    return int(blob["epoch"]), list(blob.get("history", []))


def prepare_run_dir(out_dir: Path, start_epoch: int, fresh: bool) -> None:
    """A fresh run clears what an earlier one left in `out_dir`; a resumed one drops the metrics lines of an
    epoch whose checkpoint never landed (killed between the two)."""
    metrics = out_dir / "metrics.jsonl"
    if fresh:
        for p in [*out_dir.glob("checkpoint-epoch*.pt"), out_dir / "last.pt", metrics]:
            p.unlink(missing_ok=True)
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
        write_text(metrics, "".join(ln + "\n" for ln in keep))


def save_checkpoint(out_dir: Path, epoch: int, *, model: nn.Module, model_name: str, classes: list[str],
                    plateau_cfg: dict, cfg: TrainConfig, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, inj: NoiseInjector, history: list) -> Path:
    """Write checkpoint-epochNNN.pt and last.pt (each atomically); returns the epoch's path."""
    blob: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "model_name": model_name,
        "num_classes": len(classes),
        "classes": list(classes),
        "plateau_cfg": plateau_cfg,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "noise": inj.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "noise": inj.gen.get_state()},
        "history": _plain(history),
    }
    path = out_dir / f"checkpoint-epoch{epoch:03d}.pt"
    for p in (path, out_dir / "last.pt"):
        with atomic_path(p) as tmp:
            torch.save(blob, tmp)
    return path


def _plain(obj: Any) -> Any:
    """JSON-like copy holding only dicts, lists, str, int, float, bool, None (weights_only-loadable)."""
    return json.loads(json.dumps(obj))
