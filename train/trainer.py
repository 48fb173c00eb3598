"""The training loop: one loop for every flat-training method, checkpointed per epoch, resumable, DDP-aware.

Recipe (read top to bottom in `train`):
    config -> data -> model/optimizer/schedule -> (resume) -> for each epoch:
        seed this epoch (so a resumed run replays the same noise and data order)
        for each batch: noise/SAM step (see `_train_step`) -> NaN check -> optimizer.step
        evaluate -> flatness (optional) -> checkpoint-epochNNN.pt + last.pt (atomic) -> metrics.jsonl
    quantization gap (FP vs PTQ top-1 via plateau.export) -> report.json / report.md / manifest.json

Methods (`TrainConfig.noise`):
    none          plain training
    gaussian      Gaussian WQE/AQE every step (alpha * d / sqrt(12))
    quantnoise    the same noise on a random fraction p of the elements each step
    sam           sharpness-aware minimization, radius rho (no quantization noise)
    sam-gaussian  SAM with the Gaussian noise in both passes
    ramp          Gaussian noise with alpha ramped linearly from 0 to alpha over the run
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plateau.artifacts import atomic_path, write_json, write_manifest, write_text
from plateau.data import ImageSet, batches, load_split
from plateau.errors import PlateauError
from plateau.models import model_cfg

from .flatness import measure_flatness
from .noise import NOISE_TARGETS, NoiseConfig, NoiseInjector

__all__ = ["METHODS", "TrainConfig", "train", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

METHODS = ("none", "gaussian", "quantnoise", "sam", "sam-gaussian", "ramp")
FLATNESS_MODES = ("epoch", "end", "off")
CHECKPOINT_FORMAT = "plateau.train.checkpoint"
CHECKPOINT_VERSION = 1
FLATNESS_SEED = 0  # the flatness subset is the same for every run, so runs compare


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint and in the manifest)."""

    data: str = "synthetic"
    epochs: int = 10
    batch_size: int = 128  # global: with W processes each takes batch_size // W
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    bits: str = "W8A8"
    noise: str = "gaussian"
    alpha: float = 1.0
    noise_target: str = "both"
    noise_p: float = 0.5  # quantnoise: fraction of elements perturbed per step
    rho: float = 0.05  # SAM radius
    first_last_8bit: bool = False
    seed: int = 0
    resume: bool = False
    flatness: str = "end"
    flatness_images: int = 512
    trace_samples: int = 8
    eig_iters: int = 10
    mc_samples: int = 4
    train_limit: int | None = None  # images per epoch
    eval_limit: int | None = None  # test images per evaluation
    calib_images: int = 512  # PTQ calibration images (train split) for the quantization gap
    quant_gap: bool = True  # measure FP vs PTQ top-1 at the end (needs plateau.export)
    img_size: int | None = None
    augment: bool = True
    bn_recalibrate: int = 2048  # train images re-estimating BN statistics without noise after the last epoch (0: off)
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.noise not in METHODS:
            raise ValueError(f"noise method must be one of {', '.join(METHODS)}, got {self.noise!r}")
        if self.flatness not in FLATNESS_MODES:
            raise ValueError(f"flatness must be one of {', '.join(FLATNESS_MODES)}, got {self.flatness!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.noise_target not in NOISE_TARGETS:
            raise ValueError(f"noise target must be one of {', '.join(NOISE_TARGETS)}, got {self.noise_target!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"epochs, batch size and lr must be positive (got {self.epochs}, {self.batch_size}, {self.lr})")
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")
        self.noise_config()  # validates bits, alpha, p

    def noise_config(self) -> NoiseConfig:
        """The noise injected while training (quantnoise perturbs a fraction p of the elements)."""
        return NoiseConfig(
            bits=self.bits,
            alpha=self.alpha,
            target=self.noise_target,
            first_last_8bit=self.first_last_8bit,
            p=self.noise_p if self.noise == "quantnoise" else 1.0,
        )

    def measure_noise_config(self) -> NoiseConfig:
        """The noise PTQ at the target bits would add (alpha 1, weights and activations): flatness is judged by it."""
        return NoiseConfig(bits=self.bits, alpha=1.0, target="both", first_last_8bit=self.first_last_8bit)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --- distributed -------------------------------------------------------------------------------------------------------
def _setup_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, we_initialized). Under torchrun (WORLD_SIZE > 1) start a gloo group: CPU only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# --- schedule ------------------------------------------------------------------------------------------------------------
class _WarmupCosine:
    """LR multiplier: linear warm-up then cosine to 0. A plain object, so LambdaLR saves it as numbers."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BN/bias (1-d) parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


# --- one step ------------------------------------------------------------------------------------------------------------
class _Perturbed:
    """Save exact copies of params on entry, put them back on exit (SAM's ascent step is undone this way)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    def __enter__(self) -> _Perturbed:
        self.saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)


def _freeze_bn_stats(model: nn.Module, freeze: bool, saved: dict | None = None) -> dict:
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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inj: NoiseInjector | None, data) -> int:
    """Re-estimate every BatchNorm's running mean and variance from clean forwards (no noise) over `data` batches.

    Training with activation noise leaves the running statistics of noisy activations (the variance inflated by the
    noise); evaluation and PTQ (which folds BN into the conv) see clean ones. Returns the images used.
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


def _train_step(net, raw, inj, opt, x, y, cfg, crit) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward with the method's perturbation; returns (loss, logits) of the first pass, grads in .grad.

    Weight noise is perturb-in-place before the forward and restore-exactly after the backward, so the
    optimizer steps the clean weights with the gradient taken at the noisy point.
    """
    opt.zero_grad(set_to_none=True)
    with inj.weight_noise():
        out = net(x)
        loss = crit(out, y)
        loss.backward()
    if cfg.noise in ("sam", "sam-gaussian") and cfg.rho > 0 and torch.isfinite(loss):
        params = [p for p in raw.parameters() if p.grad is not None]
        gnorm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params))
        with _Perturbed(params):
            with torch.no_grad():
                for p in params:  # ascend to the worst case within radius rho
                    p.add_(p.grad * (cfg.rho / (gnorm + 1e-12)))
            opt.zero_grad(set_to_none=True)
            saved = _freeze_bn_stats(raw, True)
            inj.observe = False  # the same batch again: count it once in the activation ranges too
            try:
                with inj.weight_noise():
                    crit(net(x), y).backward()
            finally:
                _freeze_bn_stats(raw, False, saved)
                inj.observe = True
    return loss.detach(), out.detach()


# --- evaluation ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _evaluate(model: nn.Module, data: ImageSet, mean, std, bs: int, rank: int, world: int, limit) -> dict:
    was = model.training
    model.eval()
    if limit is not None and limit < len(data):  # a fixed random subset: ImageFolder order is sorted by class
        data = data.subset(np.sort(np.random.default_rng(FLATNESS_SEED).permutation(len(data))[:limit]))
    t = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for x, y in batches(data, bs, mean, std, rank=rank, world_size=world):
        out = model(x)
        t += torch.tensor([float(F.cross_entropy(out, y, reduction="sum")), float((out.argmax(1) == y).sum()), len(y)],
                          dtype=torch.float64)
    model.train(was)
    t = _all_sum(t, world)
    return {"loss": float(t[0] / t[2]), "top1": float(100.0 * t[1] / t[2]), "n": int(t[2])}


def _fixed_batches(data: ImageSet, n: int, mean, std, bs: int = 256) -> list:
    """A fixed, seed-independent subset of the train split (no augmentation): flatness and calibration data."""
    idx = np.random.default_rng(FLATNESS_SEED).permutation(len(data))[: min(n, len(data))]
    return list(batches(data.subset(np.sort(idx)), bs, mean, std))


def _quant_gap(model: nn.Module, cfg: TrainConfig, train_set: ImageSet, test_set: ImageSet, mean, std, fp: dict) -> dict:
    """FP top-1 vs PTQ top-1 at the target bits, through the export stage's reference quantizer."""
    out = {"bits": cfg.bits, "fp_top1": fp["top1"], "calib_images": cfg.calib_images, "calib_split": "train"}
    try:
        from plateau.export import QuantConfig, quantize_model
    except ImportError as e:  # the export stage may not be installed yet: say so, do not fail the training run
        return {**out, "skipped": True, "reason": f"plateau.export.quantize_model unavailable ({e})"}
    try:
        calib = [x for x, _ in _fixed_batches(train_set, cfg.calib_images, mean, std)]
        extra = {"keep_first_last_8bit": True} if cfg.first_last_8bit else {}
        qmodel = quantize_model(copy.deepcopy(model).eval(), calib, QuantConfig.from_bits(cfg.bits, **extra))
        q = _evaluate(qmodel, test_set, mean, std, 256, 0, 1, cfg.eval_limit)
    except Exception as e:  # a failure in another stage is reported, not raised: the trained model is still good
        return {**out, "skipped": True, "reason": f"quantize_model failed: {type(e).__name__}: {e}"}
    return {**out, "skipped": False, "ptq_top1": q["top1"], "gap": fp["top1"] - q["top1"]}


# --- checkpoints ---------------------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, blob: dict, epoch: int) -> Path:
    path = folder / f"checkpoint-epoch{epoch:03d}.pt"
    for p in (path, folder / "last.pt"):
        with atomic_path(p) as tmp:
            torch.save(blob, tmp)
    return path


def _load_checkpoint(path: Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PlateauError(f"cannot resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise PlateauError(f"cannot resume: {path} is not a plateau training checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise PlateauError(f"cannot resume: {path} has checkpoint version {blob.get('version')}, expected {CHECKPOINT_VERSION}")
    return blob


def _epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63)


# --- the loop ------------------------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    cfg: TrainConfig,
    run_dir: str | Path,
    train_set: ImageSet | None = None,
    test_set: ImageSet | None = None,
    inputs: dict | None = None,
) -> dict:
    """Train `model` (any nn.Module taking NCHW images, returning logits) with `cfg`; write `<run_dir>/train/`.

    Returns the report (also saved as report.json). Raises PlateauError when the loss turns NaN/inf (the last good
    checkpoint is kept) or when resuming from an incompatible checkpoint.

        >>> model = create_model("small_cnn")
        >>> report = train(model, TrainConfig(epochs=2, noise="gaussian", bits="W4A4"), "runs/demo")
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, own_group = _setup_distributed()
    try:
        return _train(model, cfg, Path(run_dir) / "train", train_set, test_set, inputs or {}, rank, world)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(model, cfg, out_dir: Path, train_set, test_set, inputs, rank, world) -> dict:
    from tqdm import tqdm

    is_main = rank == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = getattr(model, "plateau_name", type(model).__name__)
    pcfg = model_cfg(model)
    mean, std = pcfg["mean"], pcfg["std"]

    # --- resume: the saved config wins, so the schedule and noise are the ones the run started with -----------------
    blob = None
    last = out_dir / "last.pt"
    if cfg.resume and last.is_file():
        blob = _load_checkpoint(last)
        if blob["model_name"] != model_name:
            raise PlateauError(f"cannot resume: {last} holds model {blob['model_name']!r}, not {model_name!r}")
        saved = TrainConfig.from_dict(blob["config"])
        keep = {"resume": True, "threads": cfg.threads, "progress": cfg.progress}
        changed = [f.name for f in fields(cfg) if f.name not in keep and getattr(cfg, f.name) != getattr(saved, f.name)]
        if changed and is_main:
            print(f"resume: using the checkpoint's settings for {', '.join(changed)}")
        cfg = TrainConfig(**{**saved.to_dict(), **keep})
    elif cfg.resume and is_main:
        print(f"resume: no {last} yet, starting from the beginning")

    # --- data -----------------------------------------------------------------------------------------------------------
    if train_set is None:
        train_set = load_split(cfg.data, "train", cfg.img_size)
    if test_set is None:
        test_set = load_split(cfg.data, "test", cfg.img_size)
    n_train = min(cfg.train_limit or len(train_set), len(train_set))
    n_train = (n_train // world) * world  # equal shards: every rank takes the same number of steps
    local_bs = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil((n_train // world) / local_bs)
    total_steps = steps_per_epoch * cfg.epochs
    fixed = _fixed_batches(train_set, cfg.flatness_images, mean, std) if cfg.flatness != "off" and is_main else []

    # --- model, noise, optimizer, schedule ------------------------------------------------------------------------------
    inj = NoiseInjector(model, cfg.noise_config(), torch.Generator())
    inj.enabled = cfg.noise not in ("none", "sam")
    opt = _make_optimizer(model, cfg)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _WarmupCosine(total_steps, warmup))
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch, history = 0, []
    if blob is not None:
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        inj.load_state_dict(blob["noise"])
        start_epoch, history = int(blob["epoch"]), list(blob.get("history", []))
    elif is_main:  # a fresh run: clear what an earlier run left here
        for p in list(out_dir.glob("checkpoint-epoch*.pt")) + [last, out_dir / "metrics.jsonl"]:
            p.unlink(missing_ok=True)
    if is_main and (out_dir / "metrics.jsonl").exists():  # drop lines of an epoch whose checkpoint never landed
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        keep_lines = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
        write_text(out_dir / "metrics.jsonl", "".join(ln + "\n" for ln in keep_lines))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def flatness() -> dict:
        return measure_flatness(model, fixed, cfg.measure_noise_config(), cfg.trace_samples, cfg.eig_iters,
                                cfg.mc_samples, seed=FLATNESS_SEED)

    if is_main:
        print(f"train: {model_name} on {cfg.data} ({n_train} images/epoch, {world} process(es)), method {cfg.noise}, "
              f"{cfg.bits} alpha {cfg.alpha}, epochs {start_epoch + 1}..{cfg.epochs} -> {out_dir}")
    if cfg.flatness == "epoch" and start_epoch == 0 and blob is None and is_main:
        f0 = flatness()
        history.append({"epoch": 0, "flatness": f0})
        print(f"epoch 0 (before training):{_flat_txt(f0)}")

    last_good = str(last) if blob is not None else None
    t_start = time.time()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        # Every epoch reseeds its own streams: a resumed run replays exactly what the killed one would have done.
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank, 0))
        inj.gen.manual_seed(_epoch_seed(cfg.seed, epoch, rank, 1))
        model.train()
        t0 = time.time()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (this rank)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (is_main and cfg.progress),
                   leave=False, mininterval=0.5, dynamic_ncols=True)
        data_iter = batches(train_set, local_bs, mean, std, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed * 100_003 + epoch, rank=rank, world_size=world, limit=n_train)
        for step_in_epoch, (x, y) in enumerate(data_iter):
            global_step = (epoch - 1) * steps_per_epoch + step_in_epoch
            if cfg.noise == "ramp":
                inj.scale = global_step / max(1, total_steps - 1)
            loss, out = _train_step(net, model, inj, opt, x, y, cfg, crit)
            # All ranks must agree to stop, or one would wait forever in the next all-reduce.
            bad = _all_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]), world)
            if bad.item() > 0:
                bar.close()
                where = f"epoch {epoch}, step {step_in_epoch + 1}"
                kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise PlateauError(
                    f"training loss became NaN/inf at {where} (method {cfg.noise}, {cfg.bits}, alpha {cfg.alpha}, "
                    f"lr {cfg.lr}): noise or learning rate too large; stopped, {kept}"
                )
            opt.step()
            sched.step()
            sums += torch.tensor([float(loss) * len(y), float((out.argmax(1) == y).sum()), len(y)], dtype=torch.float64)
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}",
                            noise=f"{cfg.alpha * inj.scale if inj.enabled else 0:.2f}", refresh=False)
        bar.close()
        sums = _all_sum(sums, world)
        _sync_ranges(inj, world)
        bn_images = 0
        if epoch == cfg.epochs and cfg.bn_recalibrate > 0:
            bn_images = recalibrate_bn(model, inj, batches(
                train_set, local_bs, mean, std, shuffle=True, augment=cfg.augment, seed=cfg.seed * 100_003 + 99_991,
                rank=rank, world_size=world, limit=cfg.bn_recalibrate))
        ev = _evaluate(model, test_set, mean, std, 256, rank, world, cfg.eval_limit)
        rec = {
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": float(sums[0] / sums[2]),
            "train_acc": float(100 * sums[1] / sums[2]),
            "test_loss": ev["loss"],
            "test_top1": ev["top1"],
            "noise_scale": cfg.alpha * inj.scale if inj.enabled else 0.0,
            "bn_recalibrated_images": bn_images,
            "epoch_time_s": round(time.time() - t0, 2),
        }
        if is_main and (cfg.flatness == "epoch" or (cfg.flatness == "end" and epoch == cfg.epochs)):
            rec["flatness"] = flatness()
        history.append(rec)
        if is_main:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "model_name": model_name,
                "num_classes": len(train_set.classes),
                "classes": list(train_set.classes),
                "plateau_cfg": pcfg,
                "config": cfg.to_dict(),
                "epoch": epoch,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "noise": inj.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "noise": inj.gen.get_state()},
                "history": _plain(history),
            }
            _save_checkpoint(out_dir, ckpt, epoch)
            last_good = str(last)
            with open(out_dir / "metrics.jsonl", "a") as f:  # after the checkpoint: a line always has its checkpoint
                f.write(json.dumps(rec) + "\n")
            fl = rec.get("flatness")
            ftxt = "," + _flat_txt(fl) if fl else ""
            print(f"epoch {epoch}/{cfg.epochs}: train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.2f}% | "
                  f"test top-1 {ev['top1']:.2f}% | {rec['epoch_time_s']:.1f}s{ftxt}", flush=True)
        if world > 1:
            dist.barrier()

    report: dict = {}
    if is_main:
        final = history[-1] if history else {}
        fp = _evaluate(model, test_set, mean, std, 256, 0, 1, cfg.eval_limit)
        gap = (_quant_gap(model, cfg, train_set, test_set, mean, std, fp) if cfg.quant_gap
               else {"bits": cfg.bits, "fp_top1": fp["top1"], "skipped": True, "reason": "switched off (quant_gap=False)"})
        report = _write_outputs(out_dir, cfg, model_name, pcfg, train_set, history, final, fp, gap, inputs,
                                time.time() - t_start, world)
    if world > 1:
        dist.barrier()
    return report


def _flat_txt(f: dict) -> str:
    return (f" Hessian trace {_fmt(f['hessian_trace'])}, top eigenvalue {_fmt(f['top_eigenvalue'])}, "
            f"noise loss increase {_fmt(f['noise_loss_increase'])}")


def _sync_ranges(inj: NoiseInjector, world: int) -> None:
    """Average the activation-range EMAs over ranks, so every rank (and the checkpoint) holds the same ones."""
    if world <= 1 or not inj.act_ranges:
        return
    keys = sorted(inj.act_ranges)
    t = torch.stack([inj.act_ranges[k] for k in keys]) / world
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    inj.act_ranges = {k: t[i].clone() for i, k in enumerate(keys)}


def _plain(obj):
    """JSON-like copy holding only dicts, lists, str, int, float, bool, None (weights_only-loadable)."""
    return json.loads(json.dumps(obj))


# --- reports ---------------------------------------------------------------------------------------------------------
def _write_outputs(out_dir, cfg, model_name, pcfg, train_set, history, final, fp, gap, inputs, seconds, world) -> dict:
    final_flat = next((h["flatness"] for h in reversed(history) if "flatness" in h), None)
    first_flat = next((h["flatness"] for h in history if "flatness" in h), None)
    report = {
        "stage": "train",
        "model_name": model_name,
        "num_classes": len(train_set.classes),
        "classes": list(train_set.classes),
        "plateau_cfg": pcfg,
        "config": cfg.to_dict(),
        "world_size": world,
        "epochs_run": len([h for h in history if h.get("epoch", 0) > 0]),
        "train_seconds": round(seconds, 1),
        "final": {k: v for k, v in final.items() if k != "flatness"},
        "fp_top1": fp["top1"],
        "flatness_final": final_flat,
        "flatness_initial": first_flat if first_flat is not final_flat else None,
        "quant_gap": gap,
        "history": history,
    }
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", _report_md(report))
    write_manifest(
        out_dir,
        "train",
        config=cfg.to_dict(),
        outputs={"checkpoint": "last.pt", "metrics": "metrics.jsonl", "report": "report.json", "report_md": "report.md"},
        inputs=inputs,
        model_name=model_name,
        num_classes=len(train_set.classes),
        classes=list(train_set.classes),
        plateau_cfg=pcfg,
        fp_top1=fp["top1"],
    )
    return report


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def _report_md(r: dict) -> str:
    c = r["config"]
    lines = [
        f"# Training report: {r['model_name']} on {c['data']}",
        "",
        f"- method **{c['noise']}** at {c['bits']}, alpha {c['alpha']}, target {c['noise_target']}"
        + (f", rho {c['rho']}" if c["noise"].startswith("sam") else "")
        + (f", p {c['noise_p']}" if c["noise"] == "quantnoise" else ""),
        f"- {r['epochs_run']} epoch(s), batch {c['batch_size']}, lr {c['lr']} ({c['optimizer']}, cosine), "
        f"seed {c['seed']}, {r['world_size']} process(es), {r['train_seconds']} s",
        f"- FP top-1 (test): **{r['fp_top1']:.2f}%**",
    ]
    g = r["quant_gap"]
    if g.get("skipped"):
        lines.append(f"- quantization gap at {g['bits']}: not measured ({g['reason']})")
    else:
        lines.append(f"- PTQ top-1 at {g['bits']}: **{g['ptq_top1']:.2f}%** (gap {g['gap']:+.2f} points, "
                     f"{g['calib_images']} calibration images from the train split)")
    lines += ["", "| epoch | train loss | train acc | test top-1 | noise | Hessian trace | top eig | noise dL |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in r["history"]:
        f = h.get("flatness") or {}
        lines.append(
            f"| {h['epoch']} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('train_acc'), '.2f')} | "
            f"{_fmt(h.get('test_top1'), '.2f')} | {_fmt(h.get('noise_scale'))} | {_fmt(f.get('hessian_trace'))} | "
            f"{_fmt(f.get('top_eigenvalue'))} | {_fmt(f.get('noise_loss_increase'))} |"
        )
    lines += ["", "Flatness is measured on a fixed subset of the train split (eval mode, Conv/Linear weights); "
              "'noise dL' is the Monte Carlo loss increase under Gaussian WQE+AQE at the target bits (alpha 1).", ""]
    return "\n".join(lines)
