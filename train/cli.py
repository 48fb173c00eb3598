"""`plateau train`: the command-line face of the training stage.

    plateau train --run runs/default                                  # small_cnn on synthetic data
    plateau train --run runs/r20 --model cifar_resnet20 --data ../shared/data/cifar10 \
        --checkpoint ../shared/models/cifar-resnet/resnet20-12fca82f.th --bits W4A4 --method gaussian \
        --epochs 3
    torchrun --nproc_per_node 2 -m plateau.train -- --run runs/ddp    # DistributedDataParallel, gloo on CPU
    (the `--` keeps torchrun from reading --run as its own --run-path)

The options are derived from TrainConfig's fields (config.py): a new setting there is a new option here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

import torch

from plateau.artifacts import sha256_file
from plateau.config_cli import config_options
from plateau.data import check_classes, check_image_size, load_splits
from plateau.errors import PlateauError
from plateau.models import create_model, model_cfg, parse_model_kwargs, read_torch_file

from .checkpoint import resume_candidates
from .config import TrainConfig
from .evaluate import fixed_batches
from .qat import build_qat, qat_quant_config
from .trainer import train

__all__ = ["add_arguments", "main", "default_lr"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training options to `parser` (the core CLI adds --run itself when it is missing)."""
    have = {a for act in parser._actions for a in act.option_strings}
    if "--run" not in have:
        parser.add_argument("--run", default="runs/default", help="run folder; this stage writes RUN/train/")
    g = parser.add_argument_group("train")
    g.add_argument("--model", default="small_cnn",
                   help="Plateau model (small_cnn, cifar_resnet20, ...) or timm name")
    g.add_argument("--checkpoint", default=None,
                   help="weights to fine-tune from (any format the model loader reads)")
    g.add_argument("--model-kwargs", default="", metavar="K=V,...",
                   help="keyword arguments of the model's constructor (timm's, e.g. depth=6,global_pool=avg), "
                        "recorded in the checkpoints")
    config_options(g, TrainConfig)


def main(args: argparse.Namespace) -> dict:
    """Run the training stage from parsed arguments; returns the report dict."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    # Fine-tuning starts from trained weights: a tenth of the learning rate, no warm-up.
    finetune = args.checkpoint is not None
    values["data"] = str(values["data"])
    if values["method"] is None:
        values["method"] = "lsq" if values["qat"] else "gaussian"
    lr_open = values["lr"] is None
    if values["warmup_epochs"] is None:
        values["warmup_epochs"] = 0.0 if finetune else 1.0
    try:
        # an open --lr is resolved below, once the config knows the method and BatchNorm mode; a given one (0 too)
        # is validated as it is
        cfg = TrainConfig(**{**values, "lr": 1.0 if lr_open else values["lr"]})
    except ValueError as e:  # a bad option value: one line for the user, naming the valid choices
        raise PlateauError(str(e)) from None
    if lr_open:
        cfg.lr = default_lr(cfg, finetune)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_set, test_set = load_splits(cfg.data, cfg.img_size)
    if finetune:
        _check_finetune_checkpoint(args.checkpoint, train_set, cfg.data)
    resumed_qat = check_resume_kind(Path(args.run) / "train", cfg)
    if cfg.qat and not finetune and resumed_qat is None:
        raise PlateauError("--qat fine-tunes a trained model at the target bits: pass --checkpoint (a pretrained "
                           "or flat-trained model)")
    resuming = cfg.resume and bool(resume_candidates(Path(args.run) / "train"))
    if cfg.kd > 0 and not cfg.qat and not finetune and not resuming:
        raise PlateauError("--kd distils from the model training starts from: pass --checkpoint")
    torch.manual_seed(cfg.seed)  # deterministic initialization
    model = create_model(args.model, num_classes=len(train_set.classes),
                         checkpoint=args.checkpoint if resumed_qat is None else None,
                         img_size=cfg.img_size, **parse_model_kwargs(getattr(args, "model_kwargs", "")))
    check_image_size(train_set, model_cfg(model)["input_size"], args.model)
    inputs = {"data": cfg.data, "model": args.model}
    if finetune:
        inputs["checkpoint"] = str(Path(args.checkpoint).resolve())
        inputs["checkpoint_sha256"] = sha256_file(args.checkpoint)
    if cfg.qat:
        if resumed_qat is not None:  # the FP model the run started from, as its checkpoint holds it
            model.load_state_dict(resumed_qat)
        model = qat_model(model, cfg, train_set)
    return train(model, cfg, args.run, train_set, test_set, inputs=inputs)


def default_lr(cfg: TrainConfig, finetune: bool) -> float:
    """The learning rate when --lr is not given: SGD 0.1 from scratch, a tenth fine-tuning; AdamW a hundredth."""
    lr = (1e-3 if cfg.optimizer == "adamw" else 0.1) * (0.1 if finetune else 1.0)
    # QAT with BatchNorm frozen throughout trains the folded weights (no normalization left to absorb a large
    # step): SGD a tenth again (ResNet-20 W4A4: 0.01 diverges within 5 steps, 0.003 too, 0.001 gains 8 points in
    # 20); AdamW 3e-4, the best of 1e-4 / 3e-4 / 1e-3 measured there (1e-3 falls to 50%; bench/RESULTS.md). With
    # BN on batch statistics the fine-tuning rate works; the cosine schedule is down to a tenth of it by the
    # freeze at 0.8 of the run.
    if cfg.qat and cfg.bn_freeze == 0:
        return 3e-4 if cfg.optimizer == "adamw" else lr * 0.1
    return lr


def qat_model(model: torch.nn.Module, cfg: TrainConfig, train_set) -> torch.nn.Module:
    """The QATNet of `model` at cfg.bits, its grids calibrated on the fixed calibration images."""
    mcfg = model_cfg(model)
    calib = [x for x, _ in fixed_batches(train_set, cfg.calib_images, mcfg["mean"], mcfg["std"])]
    print(f"train: --qat at {cfg.bits}: capturing {getattr(model, 'plateau_name', type(model).__name__)} (BatchNorm "
          f"folded) and calibrating on {sum(len(x) for x in calib)} train images")
    return build_qat(model, calib, qat_quant_config(cfg.bits, cfg.keep_first_last_8bit),
                     bn_batch_statistics=cfg.bn_freeze > 0)


def check_resume_kind(train_dir: Path, cfg: TrainConfig) -> dict | None:
    """With --resume over a run's last.pt: refuse a QAT flag that differs from the run's; the FP source state
    of a QAT run (None otherwise)."""
    last = train_dir / "last.pt"
    if not cfg.resume or not last.is_file():
        return None
    try:
        blob = read_torch_file(last)
    except PlateauError:
        return None  # resume_config says what is wrong with it, or takes an older epoch checkpoint
    if not isinstance(blob, dict):
        return None
    was_qat = "qat" in blob
    if was_qat != cfg.qat:
        kind = "a QAT run" if was_qat else "a flat-training run"
        raise PlateauError(f"{train_dir} holds {kind}: resume it {'with' if was_qat else 'without'} --qat")
    return blob["qat"].get("source") if was_qat else None


def _check_finetune_checkpoint(checkpoint: str, train_set, data: str) -> None:
    """A QAT checkpoint holds a quantized graph's state, not a model's weights: refused as a starting point. A
    Plateau checkpoint records its classes: fine-tuning it on data with other classes (another count, or other
    names: class i of its head would be trained to mean another thing) is refused with one line. A bare state dict
    records none and is taken as an initialization."""
    blob = read_torch_file(checkpoint)
    if not isinstance(blob, dict):
        return
    if "qat" in blob:
        bits = (blob.get("config") or {}).get("bits", "?")
        raise PlateauError(f"checkpoint {checkpoint} is a QAT checkpoint ({bits}): export it with `plateau export "
                           f"--checkpoint {checkpoint}`, or continue its run with --resume; plateau train starts "
                           "from an FP model")
    classes, n = blob.get("classes"), blob.get("num_classes")
    check_classes(train_set, classes if isinstance(classes, list) else None, n if isinstance(n, int) else None,
                  f"checkpoint {checkpoint}", data)


def _entry(argv: list[str] | None = None) -> int:
    """`python -m plateau.train`: same options; a PlateauError becomes one line on stderr and exit code 2."""
    import sys

    from plateau.cli import OneLineParser, one_line

    parser = OneLineParser(prog="plateau train", description="flat full-precision training")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    # torchrun's own parser takes `--run` for an abbreviation of its `--run-path`, so under torchrun the
    # options go after a `--`, which torchrun passes through: drop it here.
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        main(args)
    except PlateauError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"plateau train: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return 0
