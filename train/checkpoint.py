"""Checkpoints: written atomically every epoch, read back to resume a run exactly where it stopped.

A checkpoint holds plain types only (loadable with `torch.load(..., weights_only=True)`): the model's state
dict (unwrapped), what export needs to rebuild the model, the config, and the optimizer, schedule, noise and
RNG states. The config it holds wins on resume, so a resumed run continues the schedule and noise it started
with.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plateau.artifacts import save_torch, write_text
from plateau.errors import PlateauError

from .config import TrainConfig
from .noise import NoiseInjector

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "load_checkpoint",
    "resume_candidates",
    "resume_config",
    "restore_checkpoint",
    "prepare_run_dir",
    "save_checkpoint",
    "earlier_run",
    "refuse_or_clear",
]

CHECKPOINT_FORMAT = "plateau.train.checkpoint"
CHECKPOINT_VERSION = 1


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`; a PlateauError unless it is a readable Plateau checkpoint of this version."""
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol chatter would precede the one-line error
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = f"{path} is not a readable checkpoint ({type(e).__name__})"
        raise PlateauError(f"cannot resume: {reason}") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise PlateauError(f"cannot resume: {path} is not a plateau training checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise PlateauError(f"cannot resume: {path} has checkpoint version {blob.get('version')!r}, "
                           f"expected {CHECKPOINT_VERSION}")
    missing = [k for k in ("model", "model_name", "config", "epoch", "optimizer", "scheduler", "noise")
               if k not in blob]
    if missing:
        raise PlateauError(f"cannot resume: {path} lacks {', '.join(missing)} (an incomplete checkpoint)")
    return blob


def _epoch_checkpoints(out_dir: Path) -> list[Path]:
    """checkpoint-epochNNN.pt files, newest epoch first."""
    return sorted(out_dir.glob("checkpoint-epoch*.pt"), key=lambda p: p.name, reverse=True)


def resume_candidates(out_dir: Path) -> list[Path]:
    """The checkpoints --resume may continue from, in the order it tries them: last.pt, then the epochs, newest
    first."""
    return [p for p in [out_dir / "last.pt", *_epoch_checkpoints(out_dir)] if p.is_file()]


def earlier_run(out_dir: Path) -> list[str]:
    """What an earlier run left in `out_dir` that a fresh run would delete (checkpoints, report, manifest)."""
    found = []
    ckpts = _epoch_checkpoints(out_dir)
    if (out_dir / "last.pt").is_file():
        found.append("last.pt")
    if ckpts:
        found.append(f"{len(ckpts)} epoch checkpoint(s)")
    found += [n for n in ("manifest.json", "report.json") if (out_dir / n).is_file()]
    return found


def refuse_or_clear(cfg: TrainConfig, out_dir: Path) -> None:
    """A fresh run in a folder holding an earlier run: refused unless --overwrite, which deletes that run's
    files first (so nothing of it is mixed with the new one)."""
    found = earlier_run(out_dir)
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise PlateauError(f"{out_dir} already holds a training run ({', '.join(found)}): pass --resume to "
                           "continue it, or --overwrite to delete it and start over (make train RESUME=1 / "
                           "OVERWRITE=1)")
    for p in [*_epoch_checkpoints(out_dir), *(out_dir / n for n in ("last.pt", "metrics.jsonl", "report.json",
                                                                       "report.md", "manifest.json"))]:
        p.unlink(missing_ok=True)
    print(f"train: --overwrite: deleted the earlier run in {out_dir} ({', '.join(found)})")


def resume_config(
    cfg: TrainConfig, out_dir: Path, model_name: str, is_main: bool
) -> tuple[TrainConfig, dict | None]:
    """(the config to run with, the checkpoint to continue from or None). Only with `cfg.resume` and a
    last.pt: then the saved config wins, except for the settings that do not change the numbers."""
    if not cfg.resume:
        return cfg, None
    candidates = resume_candidates(out_dir)
    if not candidates:
        if is_main:
            print(f"resume: no checkpoint in {out_dir} yet, starting from the beginning")
        return cfg, None
    # last.pt first; when it is unreadable, the newest epoch checkpoint that loads (each holds the whole state)
    blob, last, first_error = None, candidates[0], None
    for p in candidates:
        try:
            blob, last = load_checkpoint(p), p
            break
        except PlateauError as e:
            first_error = first_error or e
    if blob is None:
        raise first_error
    if last != candidates[0] and is_main:
        print(f"resume: {candidates[0].name} is unreadable ({first_error}); continuing from {last.name}")
    if blob["model_name"] != model_name:
        raise PlateauError(f"cannot resume: {last} holds model {blob['model_name']!r}, not {model_name!r}")
    try:
        saved = TrainConfig.from_dict(blob["config"])
    except (ValueError, TypeError) as e:
        raise PlateauError(f"cannot resume: {last} holds an invalid config ({e})") from None
    keep = {"resume": True, "overwrite": False, "threads": cfg.threads, "progress": cfg.progress}
    changed = [f.name for f in fields(cfg)
               if f.name not in keep and getattr(cfg, f.name) != getattr(saved, f.name)]
    if changed and is_main:
        print(f"resume: using the checkpoint's settings for {', '.join(changed)}")
    return TrainConfig(**{**saved.to_dict(), **keep}), blob


def restore_checkpoint(blob: dict, model: nn.Module, opt: torch.optim.Optimizer,
                       sched: torch.optim.lr_scheduler.LRScheduler, inj: NoiseInjector,
                       teacher: nn.Module | None = None) -> tuple[int, list]:
    """Load the states of `blob` into the run's objects; (the epoch it ended, the history so far)."""
    model.load_state_dict(blob["model"])
    if teacher is not None:
        if "teacher" not in blob:
            raise PlateauError("cannot resume with --kd: the checkpoint holds no teacher (the run was started "
                               "without --kd)")
        teacher.load_state_dict(blob["teacher"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    inj.load_state_dict(blob["noise"])
    return int(blob["epoch"]), list(blob.get("history", []))


def prepare_run_dir(out_dir: Path, start_epoch: int, fresh: bool) -> None:
    """A fresh run starts its metrics anew (refuse_or_clear made sure no earlier run's checkpoints are here); a
    resumed one drops the metrics lines of an epoch whose checkpoint never landed (killed between the two) and
    a line cut short by a kill."""
    metrics = out_dir / "metrics.jsonl"
    if fresh:
        metrics.unlink(missing_ok=True)
    if metrics.exists():
        keep = []
        for ln in metrics.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] <= start_epoch:
                keep.append(ln)
        write_text(metrics, "".join(ln + "\n" for ln in keep))


def save_checkpoint(out_dir: Path, epoch: int, *, model: nn.Module, model_name: str, classes: list[str],
                    plateau_cfg: dict, cfg: TrainConfig, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, inj: NoiseInjector, history: list,
                    qat: dict | None = None, teacher: nn.Module | None = None) -> Path:
    """Write checkpoint-epochNNN.pt and last.pt (each atomically); returns the epoch's path. A QAT run's
    checkpoint holds the QATNet's state as "model" and, under "qat", the FP source and the QuantConfig that
    rebuild it (qat.QATNet.from_state)."""
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
    if qat is not None:
        blob["qat"] = qat
    if teacher is not None:  # a flat run's --kd teacher: the starting model, which a resume cannot rebuild
        blob["teacher"] = teacher.state_dict()
    path = out_dir / f"checkpoint-epoch{epoch:03d}.pt"
    for p in (path, out_dir / "last.pt"):
        save_torch(p, blob)
    return path


def _plain(obj: Any) -> Any:
    """JSON-like copy holding only dicts, lists, str, int, float, bool, None (weights_only-loadable)."""
    return json.loads(json.dumps(obj))
