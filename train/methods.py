"""Flat-training methods: one registry entry each, saying what the method perturbs and how its step runs.

    @register_method
    class MyMethod(Gaussian):              # Gaussian WQE/AQE, like `gaussian` ...
        name = "my-method"
        summary = "one line for --help and the report"
        def noise_scale(self, step, total):  # ... with its own alpha schedule
            return min(1.0, 2 * step / total)

Registering is all a new method takes: the CLI offers it (`--method my-method`), the config accepts it, and
the loop, the checkpoints and the report use it through this interface. A method that needs its own loss
(LSQ, distillation, consistency terms) overrides `step`; a setting of its own is one field in config.py.

    none          plain training
    gaussian      Gaussian WQE/AQE every step (alpha * d / sqrt(12))
    quantnoise    the same noise on a random fraction p of the elements
    sam           sharpness-aware minimization, radius rho (no quantization noise)
    sam-gaussian  SAM with the Gaussian noise in both passes
    ramp          Gaussian noise with alpha ramped linearly from 0 to alpha over the run
    alternate     Gaussian noise on every other step, none on the steps between
--kd W adds W times the distillation from the starting model's clean logits (a frozen copy of --checkpoint) to
every step of a flat method (not sam / sam-gaussian). --range-grad lets the noise's step take gradient, so the loss
pays for the weight and activation ranges (outliers) that set it (noise.py).

Quantization-aware training (`--qat`, qat.py: the model trained at the target bits in the reference numerics);
each adds its term, weighted by --qat-weight, to the cross-entropy, and --kd adds distillation from the FP model:
    lsq           learned step sizes (LSQ) alone
    fpq           FPQ: block outputs perturbed by multiplicative Gaussian noise, distilled to the FP model's
    cr            consistency regularization: two augmented views, each distilled to the FP model's other view
    mec           MEC-Quant: maximum entropy coding of the classifier's input against the FP model's
    ti            teacher intervention: the FP model's block outputs replace the student's, released over the
                  first --intervention fraction of the run, with feature and logit distillation
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch

from .perturb import StepContext, noisy_backward, sam_backward
from .qat_objectives import feature_distillation, intervention_mix, kd_loss, mec_loss, second_view

__all__ = ["Method", "register_method", "get_method", "list_methods"]

_REGISTRY: dict[str, Method] = {}
M = TypeVar("M", bound=type)


class Method:
    """A flat-training method. The defaults are plain training; an entry switches on what it perturbs.

    The switches are read by the config (noise fraction), the loop (noise on, alpha schedule) and the default
    `step` (SAM); `report_fields` maps a report label to the config field shown beside the method's name.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    noise: ClassVar[bool] = False  # Gaussian WQE/AQE on TrainConfig.noise_target, std alpha * d / sqrt(12)
    # the noise reaches a random fraction TrainConfig.noise_p of elements
    noise_fraction: ClassVar[bool] = False
    sam: ClassVar[bool] = False  # SAM: the gradient is taken again at the worst point within radius rho
    qat: ClassVar[bool] = False  # trains the quantized model (qat.QATNet, `--qat`) rather than the FP one
    report_fields: ClassVar[dict[str, str]] = {}

    def validate(self, cfg: Any) -> None:
        """Refuse (ValueError) settings the method cannot run with; `cfg` is the TrainConfig."""

    def noise_scale(self, step: int, total: int) -> float:
        """The multiplier on alpha at global step `step` of `total`: the method's alpha schedule."""
        return 1.0

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one batch, the gradients left in `.grad` for the optimizer; returns the
        detached (loss, logits) of the first pass, which the loop logs and checks for NaN."""
        loss, out = noisy_backward(ctx, x, y)
        if self.sam and ctx.cfg.rho > 0 and torch.isfinite(loss):
            sam_backward(ctx, x, y, ctx.cfg.rho)
        return loss, out


def register_method(cls: M) -> M:
    """Class decorator: add a Method subclass to the registry under its `name`."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"a training method needs a new, non-empty name, got {cls.name!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method `name`; a ValueError names the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_REGISTRY)


# --- the methods --------------------------------------------------------------------------------------------
@register_method
class Plain(Method):
    name = "none"
    summary = "plain training"


@register_method
class Gaussian(Method):
    name = "gaussian"
    summary = "Gaussian WQE/AQE every step (alpha * d / sqrt(12))"
    noise = True


@register_method
class QuantNoise(Gaussian):
    name = "quantnoise"
    summary = "the Gaussian noise on a random fraction p of the elements each step"
    noise_fraction = True
    report_fields = {"p": "noise_p"}


@register_method
class SAM(Method):
    name = "sam"
    summary = "sharpness-aware minimization, radius rho (no quantization noise)"
    sam = True
    report_fields = {"rho": "rho"}

    def validate(self, cfg: Any) -> None:
        if cfg.kd > 0:  # the ascent pass takes the cross-entropy alone
            raise ValueError(f"--kd is not supported with --method {self.name}")


@register_method
class SAMGaussian(SAM):
    name = "sam-gaussian"
    summary = "SAM with the Gaussian noise in both passes"
    noise = True


@register_method
class Ramp(Gaussian):
    name = "ramp"
    summary = "Gaussian noise with alpha ramped linearly from 0 to alpha over the run"

    def noise_scale(self, step: int, total: int) -> float:
        return step / max(1, total - 1)


@register_method
class Alternate(Gaussian):
    """Noisy and clean steps in turn. Why: noise on every step finds a minimum of the noisy loss alone, and on a
    pretrained transformer that costs FP accuracy (the ViT benchmark, bench/vit_flat.py); alternating descends
    CE(clean) + CE(noisy) in expectation at plain training's cost, so the clean loss is held while the noisy one
    flattens the minimum."""

    name = "alternate"
    summary = "Gaussian noise on every other step, none on the steps between"

    def noise_scale(self, step: int, total: int) -> float:
        return float(step % 2 == 0)


# --- quantization-aware training (the net is a qat.QATNet; ctx.model.teacher is the FP model) ----------------
class QAT(Method):
    """A QAT objective: `objective` returns (loss, logits, the FP model's logits on x when it ran the teacher
    anyway, else None); --kd adds distillation from the FP model's logits (the teacher runs once a step)."""

    qat = True
    report_fields = {"kd": "kd"}

    def objective(self, ctx: StepContext, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = ctx.net(x)
        return ctx.criterion(out, y), out, None

    def step(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.model.bn_frozen = ctx.step >= ctx.cfg.bn_freeze * ctx.total_steps  # then the folded form only
        loss, out, t_out = self.objective(ctx, x, y)
        if ctx.cfg.kd > 0:
            loss = loss + ctx.cfg.kd * kd_loss(out, ctx.model.teacher(x)[0] if t_out is None else t_out)
        loss.backward()
        return loss.detach(), out.detach()


@register_method
class LSQ(QAT):
    name = "lsq"
    summary = "QAT with learned step sizes (LSQ) and cross-entropy"


@register_method
class FPQ(QAT):
    name = "fpq"
    summary = "QAT + feature perturbation of block outputs and feature distillation to the FP model (FPQ)"
    report_fields = {"kd": "kd", "noise": "feature_noise", "weight": "qat_weight"}

    def objective(self, ctx, x, y):
        out, taps = ctx.net(x, taps=True, feature_noise=ctx.cfg.feature_noise)
        t_out, t_taps = ctx.model.teacher(x)
        fd = feature_distillation(taps, t_taps, ctx.model.taps)
        return ctx.criterion(out, y) + ctx.cfg.qat_weight * fd, out, t_out


@register_method
class CR(QAT):
    name = "cr"
    summary = "QAT + consistency regularization: two views, each distilled to the FP model's other view"
    report_fields = {"kd": "kd", "weight": "qat_weight"}

    def objective(self, ctx, x, y):
        x2 = second_view(x)
        # one forward of both views: under DistributedDataParallel a step has one forward per backward
        s1, s2 = ctx.net(torch.cat([x, x2])).split(len(x))
        t1, t2 = ctx.model.teacher(torch.cat([x, x2]))[0].split(len(x))
        ce = (ctx.criterion(s1, y) + ctx.criterion(s2, y)) / 2
        return ce + ctx.cfg.qat_weight * (kd_loss(s2, t1) + kd_loss(s1, t2)) / 2, s1, t1


@register_method
class MEC(QAT):
    name = "mec"
    summary = "QAT + maximum entropy coding of the classifier input against the FP model's (MEC-Quant)"
    report_fields = {"kd": "kd", "weight": "qat_weight"}

    def objective(self, ctx, x, y):
        out, taps = ctx.net(x, taps=True)
        t_out, t_taps = ctx.model.teacher(x)
        mec = mec_loss(taps["features"], t_taps["features"])
        return ctx.criterion(out, y) + ctx.cfg.qat_weight * mec, out, t_out


@register_method
class TeacherIntervention(QAT):
    name = "ti"
    summary = "QAT + teacher intervention: FP block outputs replace the student's, released gradually (TI)"
    report_fields = {"kd": "kd", "weight": "qat_weight", "released by": "intervention"}

    def objective(self, ctx, x, y):
        t_out, t_taps = ctx.model.teacher(x)
        mix = intervention_mix(ctx.step, ctx.total_steps, ctx.cfg.intervention)
        out, taps = ctx.net(x, taps=True, replace=t_taps, mix=mix)
        distill = kd_loss(out, t_out) + feature_distillation(taps, t_taps, ctx.model.taps)
        return ctx.criterion(out, y) + ctx.cfg.qat_weight * distill, out, t_out
