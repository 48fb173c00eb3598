"""Quantization error modelled as Gaussian noise, injected while training.

The flat-network view (Xia et al. 2025): rounding a tensor to a grid of step d adds an error that is, to a
good approximation, independent per element with variance d^2 / 12. Training with that noise added finds
minima where the loss does not care about it, so post-training quantization at the same precision costs
little.

    WQE (weights):      per output channel c, symmetric narrow range:  d_c = max|W_c| / (2^(b-1) - 1)
    AQE (activations):  per tensor, asymmetric, from an EMA of the input's min/max:  d = (hi - lo) / (2^b - 1)
    noise:              e ~ N(0, (alpha * d / sqrt(12))^2), drawn fresh each step, per element

d is a function of the tensor it perturbs. By default it is taken as a constant; with `range_grad` the gradient
goes through it too (e = d * u, u the unit draw): to each weight channel's largest |w|, and to the batch's smallest
and largest activation (the EMA's value is kept). The loss then pays for a wide range as it pays for the noise that
range makes, and training narrows the outliers that set min-max grids. For a small step, dL/dd has expectation
d * alpha^2 / 12 * tr(H) (H the loss's Hessian in the tensor): positive where the loss curves upward, so d shrinks
where the loss feels the noise.

These grids match the export stage's defaults (symmetric per-channel narrow-range weights, per-tensor
asymmetric activations), so the noise is the noise PTQ will actually add.

    >>> inj = NoiseInjector(model, NoiseConfig(bits="W4A4", alpha=1.0))
    >>> with inj.weight_noise():          # perturb weights in place ...
    ...     loss = F.cross_entropy(model(x), y); loss.backward()
    ... # ... and they are restored exactly here, before optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from plateau.quant import QType, parse_bits, rounding_noise_std

__all__ = [
    "NOISE_TARGETS",
    "NoiseConfig",
    "NoiseInjector",
    "quant_layers",
    "weight_step",
    "activation_step",
]

NOISE_TARGETS = ("weights", "activations", "both")


@dataclass
class NoiseConfig:
    """What noise to inject. `scale` multiplies alpha at run time (the ramp method moves it from 0 to 1)."""

    bits: str = "W8A8"
    alpha: float = 1.0
    target: str = "both"
    keep_first_last_8bit: bool = False
    p: float = 1.0  # fraction of elements that get noise each step (quantnoise); 1.0 = all
    ema_momentum: float = 0.1  # activation range tracker, as in PyTorch's MovingAverageMinMaxObserver
    range_grad: bool = False  # the step d takes gradient (module docstring)

    def __post_init__(self) -> None:
        self.w_bits, self.a_bits = parse_bits(self.bits)
        if self.target not in NOISE_TARGETS:
            raise ValueError(f"noise target must be one of {', '.join(NOISE_TARGETS)}, got {self.target!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"noise fraction p must be in (0, 1], got {self.p}")


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers PTQ quantizes: every Conv (1d/2d/3d) and Linear, in registration order."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def weight_step(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric narrow-range step, shaped to broadcast against w: max|W_c| / qmax,
    qmax = 2^(b-1) - 1. Differentiable in w (--range-grad takes its gradient); the noise itself is drawn under
    no_grad."""
    amax = w.abs().flatten(1).amax(1).clamp_min(1e-12)
    return (amax / QType(bits, signed=True, narrow=True).qmax).view(-1, *([1] * (w.ndim - 1)))


def _step_gradient(w: torch.Tensor, grad: torch.Tensor, unit: torch.Tensor, bits: int) -> torch.Tensor:
    """The gradient of the loss through weight_step(w) when w was perturbed by weight_step(w) * unit and `grad` is
    the loss's gradient at the perturbed point: dL/dd_c = sum_i grad_i * unit_i, reaching w through each channel's
    largest |w|: autograd through weight_step itself, so the grid is defined once."""
    with torch.enable_grad():
        w_ = w.detach().requires_grad_(True)
        step = weight_step(w_, bits)
        d_step = (grad * unit).flatten(1).sum(1).view_as(step)  # dL/dd_c
        return torch.autograd.grad(step, w_, d_step)[0]


def activation_step(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Per-tensor asymmetric step over 2^b - 1 levels, the range widened to include 0 (as choose_qparams
    does)."""
    lo_t = torch.as_tensor(lo, dtype=torch.float32).clamp_max(0.0)
    hi_t = torch.as_tensor(hi, dtype=torch.float32).clamp_min(0.0)
    return ((hi_t - lo_t) / QType(bits, signed=False).levels).clamp_min(1e-12)


class NoiseInjector:
    """Gaussian WQE/AQE for every Conv/Linear of `model`.

    Activation noise and range tracking live in forward pre-hooks: they act only in training mode (or inside
    `force()`, used by the flatness measurement). Weight noise is applied in place by the `weight_noise()`
    context and undone from saved copies, so the optimizer steps the clean weights with the gradient taken at
    the noisy point (the same mechanics as SAM).
    """

    def __init__(self, model: nn.Module, cfg: NoiseConfig, generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.scale = 1.0  # run-time multiplier on alpha
        self.enabled = True
        self.observe = True  # update activation ranges in training forwards (off for SAM's second pass)
        self._forced = False
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.layers = quant_layers(model)
        n = len(self.layers)
        # First/last layers may stay at 8 bits: they then get the (smaller) 8-bit noise.
        self.bits: dict[str, tuple[int, int]] = {}
        for i, (name, _) in enumerate(self.layers):
            edge = cfg.keep_first_last_8bit and i in (0, n - 1)
            self.bits[name] = (8, 8) if edge else (cfg.w_bits, cfg.a_bits)
        # name -> tensor([min, max]) EMA of the layer input; empty until the first training forward.
        self.act_ranges: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.layers]

    # --- switches -------------------------------------------------------------------------------------------
    @property
    def noise_weights(self) -> bool:
        return self.enabled and self.cfg.target in ("weights", "both") and self.cfg.alpha * self.scale > 0

    @property
    def noise_acts(self) -> bool:
        return self.enabled and self.cfg.target in ("activations", "both") and self.cfg.alpha * self.scale > 0

    @contextlib.contextmanager
    def force(self) -> Iterator[None]:
        """Inject activation noise even in eval mode (Monte Carlo flatness measurement); ranges are not
        updated."""
        self._forced = True
        try:
            yield
        finally:
            self._forced = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- noise ----------------------------------------------------------------------------------------------
    def _gauss(self, like: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        # drawn where the generator lives (a GPU run gets a CUDA generator: no host-side draws per step)
        e = torch.randn(like.shape, generator=self.gen, dtype=like.dtype, device=self.gen.device).to(like.device)
        e = e * std.to(like)
        if self.cfg.p < 1.0:  # quantnoise: only a random fraction p of the elements is perturbed
            keep = torch.rand(like.shape, generator=self.gen, device=self.gen.device) < self.cfg.p
            e = e * keep.to(e)
        return e

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            y = self.perturb(name, args[0], self.bits[name][1], module.training)
            return None if y is args[0] else (y, *args[1:])

        return hook

    def perturb(self, name: str, x: torch.Tensor, bits: int, training: bool, range_grad: bool = True
                ) -> torch.Tensor:
        """AQE on the activation `name` at `bits` (its range tracked in training forwards): x, or x + noise.
        `range_grad=False`: no gradient through the step here even with cfg.range_grad (a fixed export grid)."""
        if training and self.observe and not self._forced:
            self._observe(name, x)
        if not (self.noise_acts and (training or self._forced)) or name not in self.act_ranges:
            return x
        lo, hi = self.act_ranges[name]
        if self.cfg.range_grad and range_grad and training and not self._forced and x.requires_grad:
            # the EMA's value, the batch's gradient: it reaches the elements that set the range
            mn, mx = torch.aminmax(x)
            lo = lo.to(x) + (mn - mn.detach())
            hi = hi.to(x) + (mx - mx.detach())
        std = rounding_noise_std(activation_step(lo, hi, bits)) * (self.cfg.alpha * self.scale)
        return x + self._gauss(x, std)

    @torch.no_grad()
    def _observe(self, name: str, x: torch.Tensor) -> None:
        cur = torch.stack([x.detach().min(), x.detach().max()]).float().cpu()
        old = self.act_ranges.get(name)
        m = self.cfg.ema_momentum
        self.act_ranges[name] = cur if old is None else (1 - m) * old + m * cur

    @contextlib.contextmanager
    def weight_noise(self) -> Iterator[None]:
        """Add WQE to every Conv/Linear weight in place; restore the exact saved values on exit."""
        if not self.noise_weights:
            yield
            return
        saved, unit = [], []
        with torch.no_grad():
            for name, m in self.layers:
                w = m.weight
                saved.append((w, w.detach().clone()))
                step = weight_step(w, self.bits[name][0])
                e = self._gauss(w, rounding_noise_std(step) * (self.cfg.alpha * self.scale))
                w.add_(e)
                if self.cfg.range_grad:
                    unit.append((w, e / step, self.bits[name][0]))
        try:
            yield
        finally:
            with torch.no_grad():
                for w, clean in saved:
                    w.copy_(clean)
                for w, u, bits in unit:  # the backward ran inside: add the gradient through each channel's step
                    if w.grad is not None:
                        w.grad.add_(_step_gradient(w, w.grad, u, bits))

    # --- state (checkpoints hold only tensors and plain values) ---------------------------------------------
    def state_dict(self) -> dict:
        return {"act_ranges": {k: v.clone() for k, v in self.act_ranges.items()}, "scale": float(self.scale)}

    def load_state_dict(self, state: dict) -> None:
        self.act_ranges = {k: v.clone().float() for k, v in state.get("act_ranges", {}).items()}
        self.scale = float(state.get("scale", 1.0))
