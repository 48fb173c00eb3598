"""`plateau train`: the command-line face of the training stage.

    plateau train --run runs/default                                  # small_cnn on synthetic data
    plateau train --run runs/r20 --model cifar_resnet20 --data ../shared/data/cifar10 \
        --checkpoint ../shared/models/cifar-resnet/resnet20-12fca82f.th --bits W4A4 --noise gaussian --epochs 3
    torchrun --nproc_per_node 2 -m plateau.train -- --run runs/ddp    # DistributedDataParallel, gloo on CPU
    (the `--` keeps torchrun from reading --run as its own --run-path)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from plateau.artifacts import sha256_file
from plateau.data import load_split
from plateau.errors import PlateauError
from plateau.models import create_model

from .noise import NOISE_TARGETS
from .trainer import FLATNESS_MODES, METHODS, TrainConfig, train

__all__ = ["add_arguments", "main"]

_D = TrainConfig()  # defaults live in one place: the dataclass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training options to `parser` (the core CLI adds --run itself when it is missing)."""
    have = {a for act in parser._actions for a in act.option_strings}
    if "--run" not in have:
        parser.add_argument("--run", default="runs/default", help="run folder; this stage writes RUN/train/")
    g = parser.add_argument_group("train")
    g.add_argument("--model", default="small_cnn", help="Plateau model (small_cnn, cifar_resnet20, ...) or timm name")
    g.add_argument("--data", default=_D.data, help="ImageFolder tree with train/ and test/, or 'synthetic'")
    g.add_argument("--checkpoint", default=None, help="weights to fine-tune from (any format the model loader reads)")
    g.add_argument("--epochs", type=int, default=_D.epochs)
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="global batch size")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 from scratch, 0.01 fine-tuning; "
                   "AdamW: 1e-3 / 1e-4)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=_D.optimizer)
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=None, help="default 1 from scratch, 0 fine-tuning")
    g.add_argument("--bits", default=_D.bits, help="target precision, e.g. W8A8, W4A8, W4A4")
    g.add_argument("--noise", choices=METHODS, default=_D.noise, help="flat-training method")
    g.add_argument("--alpha", type=float, default=_D.alpha, help="noise std as a multiple of step/sqrt(12)")
    g.add_argument("--noise-target", choices=NOISE_TARGETS, default=_D.noise_target)
    g.add_argument("--noise-p", type=float, default=_D.noise_p, help="quantnoise: fraction of elements perturbed")
    g.add_argument("--rho", type=float, default=_D.rho, help="SAM radius")
    g.add_argument("--first-last-8bit", action="store_true", help="keep the first and last layer at 8 bits")
    g.add_argument("--seed", type=int, default=_D.seed)
    g.add_argument("--resume", action="store_true", help="continue from RUN/train/last.pt")
    g.add_argument("--flatness", choices=FLATNESS_MODES, default=_D.flatness, help="when to measure flatness")
    g.add_argument("--flatness-images", type=int, default=_D.flatness_images)
    g.add_argument("--trace-samples", type=int, default=_D.trace_samples, help="Hutchinson vectors")
    g.add_argument("--eig-iters", type=int, default=_D.eig_iters, help="power iterations (0: skip)")
    g.add_argument("--mc-samples", type=int, default=_D.mc_samples, help="Monte Carlo noise draws (0: skip)")
    g.add_argument("--train-limit", type=int, default=None, help="training images per epoch (quick runs)")
    g.add_argument("--eval-limit", type=int, default=None, help="test images per evaluation")
    g.add_argument("--calib-images", type=int, default=_D.calib_images, help="PTQ calibration images (train split)")
    g.add_argument("--bn-recalibrate", type=int, default=_D.bn_recalibrate, help="train images re-estimating "
                   "BatchNorm statistics without noise after the last epoch (0: off)")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--threads", type=int, default=None, help="torch threads per process")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> dict:
    """Run the training stage from parsed arguments; returns the report dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    finetune = args.checkpoint is not None
    adamw = args.optimizer == "adamw"
    lr = args.lr if args.lr is not None else (1e-3 if adamw else 0.1) * (0.1 if finetune else 1.0)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else (0.0 if finetune else 1.0)
    try:
        cfg = TrainConfig(
            data=str(args.data), epochs=args.epochs, batch_size=args.batch_size, lr=lr, optimizer=args.optimizer,
            weight_decay=args.weight_decay, warmup_epochs=warmup, bits=args.bits, noise=args.noise, alpha=args.alpha,
            noise_target=args.noise_target, noise_p=args.noise_p, rho=args.rho, first_last_8bit=args.first_last_8bit,
            seed=args.seed, resume=args.resume, flatness=args.flatness, flatness_images=args.flatness_images,
            trace_samples=args.trace_samples, eig_iters=args.eig_iters, mc_samples=args.mc_samples,
            train_limit=args.train_limit, eval_limit=args.eval_limit, calib_images=args.calib_images,
            bn_recalibrate=args.bn_recalibrate,
            img_size=args.img_size, threads=args.threads, progress=not args.no_progress,
        )
    except ValueError as e:  # a bad option value: one line for the user, naming the valid choices
        raise PlateauError(str(e)) from None
    train_set = load_split(cfg.data, "train", cfg.img_size)
    test_set = load_split(cfg.data, "test", cfg.img_size)
    torch.manual_seed(cfg.seed)  # deterministic initialization
    model = create_model(args.model, num_classes=len(train_set.classes), checkpoint=args.checkpoint,
                         img_size=cfg.img_size)
    inputs = {"data": cfg.data, "model": args.model}
    if finetune:
        inputs["checkpoint"] = str(Path(args.checkpoint).resolve())
        inputs["checkpoint_sha256"] = sha256_file(args.checkpoint)
    return train(model, cfg, args.run, train_set, test_set, inputs=inputs)


def _entry(argv: list[str] | None = None) -> int:
    """`python -m plateau.train`: same options; a PlateauError becomes one line on stderr and exit code 2."""
    import sys

    parser = argparse.ArgumentParser(prog="plateau train", description="flat full-precision training")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    # torchrun's own parser takes `--run` for an abbreviation of its `--run-path`, so under torchrun the options
    # go after a `--`, which torchrun passes through: drop it here.
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        main(args)
    except PlateauError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"plateau train: error: {e}", file=sys.stderr)
        return 2
    return 0
