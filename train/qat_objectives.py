"""The loss terms of the QAT methods (methods.py), as plain functions of logits and features.

Where a paper leaves a detail open, the choice made here is said in the function's docstring; `docs/qat.md` gives
the measured effect of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "feature_distillation", "mec_loss", "second_view", "intervention_mix"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * (t * t)


def feature_distillation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                         names: list[str]) -> torch.Tensor:
    """Mean over `names` of the squared error of student features against the teacher's, each normalized by the
    teacher's mean square (so a wide block does not outweigh a narrow one)."""
    terms = [((student[k] - teacher[k]) ** 2).mean() / (teacher[k] ** 2).mean().clamp_min(1e-12) for k in names]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def mec_loss(z_student: torch.Tensor, z_teacher: torch.Tensor, order: int = 4) -> torch.Tensor:
    """Maximum entropy coding of the student's representation against the teacher's (MEC, Liu et al. 2022, as
    MEC-Quant uses it): -tr log(I + C) / d with C = Z_s^T Z_t / m the cross-correlation of the L2-normalized
    features (m images, d features), by its Taylor series to `order`.

    Choice: C is divided by the batch size m (lambda = 1/m), so its spectral norm is at most 1 and the series
    converges for any batch; the paper's mixture-of-experts reformulation (for long-tailed weights) is not used.
    """
    zs = F.normalize(z_student.flatten(1), dim=1)
    zt = F.normalize(z_teacher.flatten(1), dim=1)
    m, d = zs.shape
    c = zs.T @ zt / m if d <= m else zs @ zt.T / m  # the smaller square: the same nonzero spectrum
    power, total = c, torch.zeros((), device=c.device)
    for k in range(1, order + 1):
        if k > 1:
            power = power @ c
        total = total + (1 if k % 2 else -1) * torch.trace(power) / k
    return -total / min(m, d)


def second_view(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Another augmented view of a batch (consistency regularization): a random shift by up to `pad` pixels
    (reflect padding, on the normalized tensor) and a random horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    ox = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    oy = torch.randint(0, 2 * pad + 1, (n,)).tolist()
    flip = (torch.rand(n) < 0.5).tolist()
    views = []
    for i in range(n):
        v = padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        views.append(v.flip(-1) if flip[i] else v)
    return torch.stack(views)


def intervention_mix(step: int, total: int, fraction: float) -> float:
    """Teacher intervention's weight at `step` of `total`: 1 (the teacher's block outputs replace the student's)
    falling linearly to 0 at `fraction` of the run, 0 after (the student alone, as deployed).

    Choice: one schedule for every block (the paper's gradual intervention releases sublayers in stages; one
    linear release is its simplest form)."""
    if fraction <= 0:
        return 0.0
    return max(0.0, 1.0 - step / (fraction * max(1, total)))
