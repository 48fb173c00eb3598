"""Learned rounding (AdaRound, with QDrop-style input mixing), layer by layer.

For each conv/linear layer in order, the rounding direction of every weight is learned on calibration images so
that the layer reproduces its full-precision output:

    W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax),   h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)
    loss   = mean((layer(X_in; W_soft) - layer(X_fp; W))^2) + lambda * sum(1 - |2 h(V) - 1|^beta)

X_in is the layer's input in the partly quantized model (earlier layers already rounded, activations
fake-quantized), mixed element-wise with the full-precision input (QDrop), which keeps the solution from
over-fitting the calibration set. beta anneals from 20 to 2, pushing h(V) to 0 or 1; the learned rounding is then
floor(W / s) + (h(V) >= 0.5). Scales, zero points and the int32 bias rule are unchanged, so the reference, the
ONNX writer and the compiler need nothing new.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import QuantConfig
from .graph import QGraph, QNode
from .quantize import ActQ, WeightQ, _with_bias, run_graph

__all__ = ["learn_rounding"]

_ZETA, _GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _h_inverse(frac: torch.Tensor) -> torch.Tensor:
    p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _layer(n: QNode, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = n.attrs
    if n.op == "conv":
        y = F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
    else:
        y = F.linear(x, w, b)
    return F.relu(y) if n.relu else y


def _inputs(graph: QGraph, batches: list[torch.Tensor], name: str, acts, weights) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run_graph(graph, x, acts, weights, keep=True)[name] for x in batches])


def _optimize(n: QNode, wq: WeightQ, x_q: torch.Tensor, x_fp: torch.Tensor, cfg: QuantConfig,
              gen: torch.Generator) -> torch.Tensor:
    """Learn the rounding of one layer; returns the new integer weights."""
    s = wq.scale.view(-1, *([1] * (n.weight.ndim - 1)))
    w_floor = torch.floor(n.weight / s)
    v = _h_inverse(n.weight / s - w_floor).requires_grad_(True)
    qmin, qmax = wq.qtype.qmin, wq.qtype.qmax
    with torch.no_grad():
        target = torch.cat([_layer(n, x_fp[i:i + 256], n.weight, n.bias) for i in range(0, len(x_fp), 256)])
    opt = torch.optim.Adam([v], lr=1e-2)
    iters, warm = cfg.adaround_iters, int(0.2 * cfg.adaround_iters)
    lam = 0.01
    for it in range(iters):
        idx = torch.randint(0, len(x_q), (cfg.adaround_batch,), generator=gen)
        xin = x_q[idx]
        if cfg.adaround_act_quant:
            keep_fp = torch.rand(xin.shape, generator=gen) < 0.5
            xin = torch.where(keep_fp, x_fp[idx], xin)
        w = s * torch.clamp(w_floor + _h(v), qmin, qmax)
        rec = (_layer(n, xin, w, n.bias) - target[idx]).pow(2).sum(1).mean()
        loss = rec
        if it >= warm:
            beta = 2 + (20 - 2) * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm))) / 2
            loss = loss + lam * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.clamp(w_floor + (_h(v) >= 0.5).float(), qmin, qmax)


def learn_rounding(graph: QGraph, acts: dict[str, ActQ], weights: dict[str, WeightQ], calib: list[torch.Tensor],
                   cfg: QuantConfig, progress: bool = False) -> dict[str, WeightQ]:
    """Replace round-to-nearest weights by learned rounding, layer by layer (earlier layers first)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    done: dict[str, WeightQ] = {}
    layers = graph.weighted()
    for n in tqdm(layers, desc="learned rounding", unit="layer", disable=not progress, leave=False):
        wq = weights[n.name]
        x_fp = _inputs(graph, calib, n.inputs[0], None, None)
        x_q = _inputs(graph, calib, n.inputs[0], acts, done)
        with torch.enable_grad():
            q = _optimize(n, wq, x_q, x_fp, cfg, gen)
        done[n.name] = _with_bias(n, q, wq.scale, wq.qtype, acts)
    return done
