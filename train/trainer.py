"""The training loop: one loop for every flat-training method, checkpointed per epoch, resumable, DDP-aware.

Recipe (read top to bottom in `_train`):
    config (+ resume: the checkpoint's config wins) -> data -> noise/optimizer/schedule -> for each epoch:
        seed this epoch (so a resumed run replays the same noise and data order)
        for each batch: the method's alpha schedule and step (methods.py) -> NaN check -> optimizer.step
        (last epoch) BN recalibration -> evaluate -> flatness
        -> checkpoint-epochNNN.pt + last.pt -> metrics.jsonl
    quantization gap (quant_gap.py) -> report.json / report.md / manifest.json (report.py)

What a method perturbs and how its step runs is its registry entry (methods.py); nothing here names a method.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from plateau.capture import unfused_attention
from plateau.data import ImageSet, batches, load_split
from plateau.errors import PlateauError
from plateau.models import model_cfg
from plateau.staging import clean_temporaries, note, stage_lock, write_failure

from .bn import recalibrate_bn
from .checkpoint import prepare_run_dir, refuse_or_clear, restore_checkpoint, resume_config, save_checkpoint
from .config import TrainConfig
from .distributed import all_sum, setup_distributed, sync_ranges
from .evaluate import FLATNESS_SEED, evaluate, fixed_batches, on_device
from .flatness import measure_flatness
from .graph_noise import attention_noise_graph
from .noise import NoiseInjector
from .optim import make_optimizer, make_scheduler
from .perturb import StepContext
from .qat import qat_gap
from .quant_gap import measure_quant_gap
from .report import flatness_text, write_report

__all__ = ["train"]


def train(
    model: nn.Module,
    cfg: TrainConfig,
    run_dir: str | Path,
    train_set: ImageSet | None = None,
    test_set: ImageSet | None = None,
    inputs: dict | None = None,
) -> dict:
    """Train `model` (any nn.Module taking NCHW images, returning logits) with `cfg`; write
    `<run_dir>/train/`.

    Returns the report (also saved as report.json). Raises PlateauError when the loss turns NaN/inf (the last
    good checkpoint is kept) or when resuming from an incompatible checkpoint.

        >>> model = create_model("small_cnn")
        >>> report = train(model, TrainConfig(epochs=2, method="gaussian", bits="W4A4"), "runs/demo")
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, own_group = setup_distributed(cfg.device)
    try:
        if cfg.range_grad and world > 1:  # before the run folder is touched (--overwrite clears it)
            # each rank's draw would meet the all-reduced gradient, not the rank's own one
            raise PlateauError("--range-grad runs in one process: its weight-step gradient is formed after DDP's "
                               "all-reduce")
        return _train(model, cfg, Path(run_dir) / "train", train_set, test_set, inputs or {}, rank, world)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63)


def _train(model: nn.Module, cfg: TrainConfig, out_dir: Path, train_set: ImageSet | None,
           test_set: ImageSet | None, inputs: dict, rank: int, world: int) -> dict:
    """Hold the folder's lock (rank 0: one training run per folder), refuse to start over an earlier run
    without --overwrite, then train. Every rank learns whether rank 0 could start, so none waits forever."""
    is_main = rank == 0
    with contextlib.ExitStack() as stack:
        failure = None
        if is_main:
            try:
                stack.enter_context(stage_lock(out_dir))
                out_dir.mkdir(parents=True, exist_ok=True)
                removed = clean_temporaries(out_dir)
                if removed:
                    note(f"removed {len(removed)} temporary file(s) an interrupted run left in {out_dir}")
                refuse_or_clear(cfg, out_dir)
            except OSError as e:
                failure = write_failure(e.filename or out_dir, e)
            except PlateauError as e:
                failure = e
        if all_sum(torch.tensor([1.0 if failure else 0.0]), world).item() > 0:
            raise failure or PlateauError("rank 0 could not start the run (its message says why)")
        try:
            return _train_locked(model, cfg, out_dir, train_set, test_set, inputs, rank, world)
        except OSError as e:
            err = write_failure(e.filename or out_dir, e)
            kept = ("the checkpoints written before are kept (continue with --resume)"
                    if (out_dir / "last.pt").is_file() else "no checkpoint was written")
            raise PlateauError(f"{err}; {kept}") from None


def _train_locked(model: nn.Module, cfg: TrainConfig, out_dir: Path, train_set: ImageSet | None,
                  test_set: ImageSet | None, inputs: dict, rank: int, world: int) -> dict:
    from tqdm import tqdm

    is_main = rank == 0
    model_name = getattr(model, "plateau_name", type(model).__name__)
    pcfg = model_cfg(model)
    mean, std = pcfg["mean"], pcfg["std"]
    last = out_dir / "last.pt"
    cfg, blob = resume_config(cfg, out_dir, model_name, is_main)
    method = cfg.training_method
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PlateauError("--device cuda: no CUDA GPU is visible to torch on this machine (train on --device cpu)")
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.device == "cuda" else torch.device("cpu")
    model.to(device)
    # a flat run's --kd teacher: the model as training starts (a resume restores it from the checkpoint)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kd > 0 and not cfg.qat else None

    # --- data -----------------------------------------------------------------------------------------------
    if train_set is None:
        train_set = load_split(cfg.data, "train", cfg.img_size)
    if test_set is None:
        test_set = load_split(cfg.data, "test", cfg.img_size)
    n_train = min(cfg.train_limit or len(train_set), len(train_set))
    n_train = (n_train // world) * world  # equal shards: every rank takes the same number of steps
    local_bs = max(1, cfg.batch_size // world)
    steps_per_epoch = math.ceil((n_train // world) / local_bs)
    total_steps = steps_per_epoch * cfg.epochs
    # QAT trains through straight-through rounding: no Hessian to measure there
    measure = cfg.flatness != "off" and is_main and not cfg.qat
    fixed = list(on_device(fixed_batches(train_set, cfg.flatness_images, mean, std), device)) if measure else []

    # --- noise, optimizer, schedule (restored on resume) ----------------------------------------------------
    inj = NoiseInjector(model, cfg.noise_config(), torch.Generator(device=device))
    inj.enabled = method.noise
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, total_steps, int(round(cfg.warmup_epochs * steps_per_epoch)))
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch, history = restore_checkpoint(blob, model, opt, sched, inj, teacher) if blob is not None else (0, [])
    if is_main:
        prepare_run_dir(out_dir, start_epoch, fresh=blob is None)
    # a transformer trains through a traced copy with noise inside attention as well (graph_noise.py)
    traced = attention_noise_graph(model, inj, cfg.probability_bits) if method.noise else None
    body = traced if traced is not None else model
    # a QAT net's conv biases get no gradient while BatchNorm runs on batch statistics (the batch mean cancels them)
    net = nn.parallel.DistributedDataParallel(body, find_unused_parameters=cfg.qat) if world > 1 else body
    ctx = StepContext(net=net, model=model, injector=inj, optimizer=opt, criterion=crit, cfg=cfg, teacher=teacher)

    def flatness() -> dict:
        with unfused_attention(model):  # a fused attention kernel has no second derivative
            return measure_flatness(model, fixed, cfg.measure_noise_config(), cfg.trace_samples, cfg.eig_iters,
                                    cfg.mc_samples, seed=FLATNESS_SEED)

    if is_main:
        print(f"train: {model_name} on {cfg.data} ({n_train} images/epoch, {world} process(es)), method "
              f"{cfg.method}, {cfg.bits} alpha {cfg.alpha}, epochs {start_epoch + 1}..{cfg.epochs} "
              f"-> {out_dir}")
    if cfg.flatness == "epoch" and start_epoch == 0 and blob is None and measure:
        f0 = flatness()
        history.append({"epoch": 0, "flatness": f0})
        print(f"epoch 0 (before training):{flatness_text(f0)}")

    last_good = str(last) if blob is not None else None
    t_start = time.time()
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        # Every epoch reseeds its own streams: a resumed run replays exactly what the killed one would have
        # done.
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank, 0))
        inj.gen.manual_seed(_epoch_seed(cfg.seed, epoch, rank, 1))
        model.train()
        t0 = time.time()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count (this rank)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=True if not (is_main and cfg.progress) else None,  # None: only on a terminal
                   leave=False, mininterval=0.5, dynamic_ncols=True)
        data_iter = on_device(batches(train_set, local_bs, mean, std, shuffle=True, augment=cfg.augment,
                                      seed=cfg.seed * 100_003 + epoch, rank=rank, world_size=world,
                                      limit=n_train), device)
        for step_in_epoch, (x, y) in enumerate(data_iter):
            ctx.step, ctx.total_steps = (epoch - 1) * steps_per_epoch + step_in_epoch, total_steps
            inj.scale = method.noise_scale(ctx.step, total_steps)
            loss, out = method.step(ctx, x, y)
            # All ranks must agree to stop, or one would wait forever in the next all-reduce.
            bad = all_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]), world)
            if bad.item() > 0:
                bar.close()
                where = f"epoch {epoch}, step {step_in_epoch + 1}"
                kept = (f"the last good checkpoint is {last_good}" if last_good
                        else "no checkpoint was written")
                raise PlateauError(
                    f"training loss became NaN/inf at {where} (method {cfg.method}, {cfg.bits}, "
                    f"alpha {cfg.alpha}, lr {cfg.lr}): noise or learning rate too large; stopped, {kept}"
                )
            opt.step()
            if cfg.qat:
                model.after_step()  # learned scales stay positive
            sched.step()
            sums += torch.tensor([float(loss) * len(y), float((out.argmax(1) == y).sum()), len(y)],
                                 dtype=torch.float64)
            bar.update(1)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}",
                            noise=f"{cfg.alpha * inj.scale if inj.enabled else 0:.2f}", refresh=False)
        bar.close()
        sums = all_sum(sums, world)
        sync_ranges(inj, world)

        bn_images = 0
        if epoch == cfg.epochs and cfg.bn_recalibrate > 0:
            bn_data = on_device(batches(train_set, local_bs, mean, std, shuffle=True, augment=cfg.augment,
                                        seed=cfg.seed * 100_003 + 99_991, rank=rank, world_size=world,
                                        limit=cfg.bn_recalibrate), device)
            bn_images = recalibrate_bn(model, inj, bn_data)
        ev = evaluate(model, test_set, mean, std, 256, rank, world, cfg.eval_limit)
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
        if measure and (cfg.flatness == "epoch" or (cfg.flatness == "end" and epoch == cfg.epochs)):
            rec["flatness"] = flatness()
        history.append(rec)
        if is_main:
            save_checkpoint(out_dir, epoch, model=model, model_name=model_name, classes=train_set.classes,
                            plateau_cfg=pcfg, cfg=cfg, opt=opt, sched=sched, inj=inj, history=history,
                            qat=model.checkpoint_extra() if cfg.qat else None, teacher=teacher)
            last_good = str(last)
            with open(out_dir / "metrics.jsonl", "a") as f:  # after the checkpoint: no line without one
                f.write(json.dumps(rec) + "\n")
            ftxt = "," + flatness_text(rec["flatness"]) if rec.get("flatness") else ""
            print(f"epoch {epoch}/{cfg.epochs}: train loss {rec['train_loss']:.4f} "
                  f"acc {rec['train_acc']:.2f}% | test top-1 {ev['top1']:.2f}% | "
                  f"{rec['epoch_time_s']:.1f}s{ftxt}", flush=True)
        if world > 1:
            dist.barrier()

    report: dict = {}
    if is_main:
        fp = evaluate(model, test_set, mean, std, 256, 0, 1, cfg.eval_limit)
        gap = (qat_gap(model, cfg, test_set, mean, std, fp["top1"]) if cfg.qat
               else measure_quant_gap(model, cfg, train_set, test_set, mean, std, fp["top1"]))
        report = write_report(out_dir, cfg, model_name=model_name, plateau_cfg=pcfg,
                              classes=train_set.classes, history=history, fp=fp, gap=gap, inputs=inputs,
                              seconds=time.time() - t_start, world=world)
    if world > 1:
        dist.barrier()
    return report
