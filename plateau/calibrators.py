"""Calibration methods, one registry entry each.

    ACT_CALIBRATORS     an activation's Observer -> its clipping range (lo, hi): minmax, percentile, mse, kl
    WEIGHT_CALIBRATORS  a float weight -> per-output-channel symmetric scales: minmax, mse

Adding a calibrator is one decorated function here (`@act_calibrator("name")` or
`@WEIGHT_CALIBRATORS.register("name")`): QuantConfig accepts the name, `plateau export` offers it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from plateau.quant import QType, choose_qparams, quantize
from plateau.registry import Registry

__all__ = ["Observer", "ActCalibrator", "ACT_CALIBRATORS", "WEIGHT_CALIBRATORS", "act_calibrator", "weight_scales"]


class Observer:
    """Streams a tensor's range, then (second pass) a fixed-range histogram: memory does not grow with data."""

    BINS = 2048

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")
        self.hist: torch.Tensor | None = None

    def update_range(self, t: torch.Tensor) -> None:
        self.lo = min(self.lo, float(t.min()))
        self.hi = max(self.hi, float(t.max()))

    def update_hist(self, t: torch.Tensor) -> None:
        lo, hi = self.range()
        h = torch.histc(t.detach().float().flatten(), self.BINS, lo, hi)
        self.hist = h if self.hist is None else self.hist + h

    def range(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return lo, hi if hi > lo else lo + 1e-8

    def histogram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts, bin edges, bin centres) of the second pass."""
        lo, hi = self.range()
        edges = np.linspace(lo, hi, self.BINS + 1)
        return self.hist.double().numpy(), edges, (edges[:-1] + edges[1:]) / 2


@dataclass(frozen=True)
class ActCalibrator:
    """Clipping range (lo, hi) of one activation from its observer, its type and the percentile setting;
    `histogram`: it needs the second (histogram) pass."""

    clip: Callable[[Observer, QType, float], tuple[float, float]]
    histogram: bool = True


ACT_CALIBRATORS: Registry[ActCalibrator] = Registry("activation calibration")
WEIGHT_CALIBRATORS: Registry[Callable[[torch.Tensor, QType], torch.Tensor]] = Registry("weight calibration")


def act_calibrator(name: str, histogram: bool = True):
    """Decorator: file a clipping-range function under `name`."""

    def deco(fn: Callable[[Observer, QType, float], tuple[float, float]]):
        ACT_CALIBRATORS.add(name, ActCalibrator(fn, histogram))
        return fn

    return deco


@act_calibrator("minmax", histogram=False)
def _minmax(o: Observer, qt: QType, percentile: float) -> tuple[float, float]:
    return o.range()


@act_calibrator("percentile")
def _percentile(o: Observer, qt: QType, percentile: float) -> tuple[float, float]:
    lo, _ = o.range()
    h, edges, _ = o.histogram()
    cdf = np.cumsum(h) / max(h.sum(), 1.0)
    p = percentile / 100.0
    c_lo = edges[np.searchsorted(cdf, 1.0 - p)] if lo < 0 else 0.0
    c_hi = edges[min(np.searchsorted(cdf, p) + 1, Observer.BINS)]
    return min(float(c_lo), 0.0), max(float(c_hi), 1e-8)


@act_calibrator("mse")
def _mse(o: Observer, qt: QType, percentile: float) -> tuple[float, float]:
    """Shrink the range by a common factor, keep the one with the least expected squared error. The error is an
    estimate over histogram bin centres (float64), not a quantization of data, so it is computed here."""
    lo, hi = o.range()
    h, _, centers = o.histogram()
    best, best_err = (lo, hi), float("inf")
    for r in np.linspace(0.2, 1.0, 81):
        s, z = choose_qparams(lo * r, hi * r, qt, symmetric=False)
        q = np.clip(np.rint(centers / s) + z, qt.qmin, qt.qmax)
        err = float((h * (centers - (q - z) * s) ** 2).sum())
        if err < best_err:
            best, best_err = (lo * r, hi * r), err
    return float(best[0]), float(best[1])


def _kl_divergence(h: np.ndarray, a: int, b: int, levels: int) -> float:
    """KL(P || Q): P = histogram clipped to bins [a, b) with outliers folded into the edge bins, Q = the clipped
    histogram merged into `levels` buckets and spread back evenly over each bucket's non-empty bins."""
    inside = h[a:b].astype(np.float64)
    p = inside.copy()
    p[0] += h[:a].sum()
    p[-1] += h[b:].sum()
    # Q is built from the clipped histogram without the folded outliers, so clipping mass away costs divergence.
    q = np.zeros_like(p)
    for chunk in np.array_split(np.arange(len(p)), levels):
        nz = chunk[inside[chunk] > 0]
        if len(nz):
            q[nz] = inside[chunk].sum() / len(nz)
    mask = p > 0
    pn, qn = p[mask] / p.sum(), np.maximum(q[mask], 1e-12) / q.sum()
    return float((pn * np.log(pn / qn)).sum())


@act_calibrator("kl")
def _kl(o: Observer, qt: QType, percentile: float) -> tuple[float, float]:
    """KL-entropy calibration: the clipping range whose quantized histogram diverges least from the observed one.

    The upper end is searched first (lower end at the minimum), then the lower end with that upper end; each over
    a geometric grid from `levels` bins in range up to all of them. A range that starts at 0 (ReLU) keeps lo = 0.
    """
    h, edges, _ = o.histogram()
    levels, nb = qt.levels + 1, len(h)
    if h.sum() == 0 or nb <= levels:
        return float(edges[0]), float(edges[-1])
    zero = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, nb - 1))
    best_b = min(range(max(zero + 1, levels), nb + 1, max(1, (nb - levels) // 64)),
                 key=lambda b: _kl_divergence(h, 0, b, levels), default=nb)
    if zero > 0 and best_b - levels > 0:
        best_a = min(range(0, min(zero, best_b - levels) + 1, max(1, zero // 32)),
                     key=lambda a: _kl_divergence(h, a, best_b, levels))
    else:
        best_a = 0
    return min(float(edges[best_a]), 0.0), max(float(edges[min(best_b, nb)]), 1e-8)


@WEIGHT_CALIBRATORS.register("minmax")
def _weight_minmax(w: torch.Tensor, qtype: QType) -> torch.Tensor:
    amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12)
    return (amax / qtype.qmax).float()


@WEIGHT_CALIBRATORS.register("mse")
def _weight_mse(w: torch.Tensor, qtype: QType) -> torch.Tensor:
    """A clipping ratio per output channel: the one with the least squared rounding error."""
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(1).clamp_min(1e-12)
    best_s = amax / qtype.qmax
    best_err = torch.full_like(amax, float("inf"))
    for r in torch.linspace(0.5, 1.0, 51):
        s = amax * r / qtype.qmax
        err = ((quantize(flat, s, 0, qtype, axis=0) * s[:, None] - flat) ** 2).sum(1)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s.float()


def weight_scales(w: torch.Tensor, qtype: QType, method: str) -> torch.Tensor:
    """Per-output-channel symmetric scales by the weight calibrator `method`."""
    return WEIGHT_CALIBRATORS.get(method)(w, qtype)
