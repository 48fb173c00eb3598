"""Learned rounding (AdaRound), per layer or per block (BRECQ), with QDrop-style activation quantization inside the
reconstruction and, optionally, learned activation clipping.

The model is reconstructed one unit at a time, earlier units first. A unit is one conv/linear layer
(reconstruction="layer") or one block (reconstruction="block": the nodes between two points of the graph where a
single tensor carries everything later nodes need, e.g. a residual block from its input to its add; a unit with no
conv/linear is folded into the next). For every weight of the unit the rounding direction is learned on calibration
images so that the unit reproduces its full-precision output:

    W_soft = s * clamp(floor(W / s) + h(V), qmin, qmax),   h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)
    loss   = mean((unit(X_in; W_soft) - unit(X_fp; W))^2) + lambda * sum(1 - |2 h(V) - 1|^beta)

X_in is the unit's input in the partly quantized model (earlier units already rounded, activations fake-quantized),
mixed element-wise with the full-precision input (QDrop); quantization points inside a block are fake-quantized and
mixed with their unquantized value the same way. Both keep the solution from over-fitting the calibration set.
beta anneals from 20 to 2, pushing h(V) to 0 or 1; the learned rounding is then floor(W / s) + (h(V) >= 0.5).

learn_act_clip also learns the scale of every activation quantization point in the unit, its output included (not
the logits), by the straight-through gradient of fake_quantize (LSQ), with the zero point fixed: the clipping range
[(qmin - zp) * s, (qmax - zp) * s] moves with it. Such a learned scale tends to settle where a frequent value sits
on a rounding boundary (the loss is discontinuous there): then any backend whose arithmetic differs in the last
bits (onnxruntime's fixed-point QLinearAdd, a device's integer requantize) rounds that value the other way. So each
learned scale is finally moved by at most 0.2% to where the fewest calibration values lie within 1e-4 steps of a
.5 boundary (`away_from_ties`). Biases are re-quantized at the end, at the final s_x * s_w.
Everything else (the int32 bias rule, the reference, the ONNX writer, the compiler) is unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from plateau.calibrate import with_bias
from plateau.ops import OPS
from plateau.ops.base import relu_clip
from plateau.qconfig import ROUNDINGS, QuantConfig
from plateau.qgraph import ActQ, QGraph, QNode, WeightQ, reconstruction_units
from plateau.quant import fake_quantize
from plateau.reference import run_nodes

__all__ = ["learn_rounding", "reconstruction_units", "away_from_ties"]

_ZETA, _GAMMA = 1.1, -0.1
_LAMBDA = 0.01
_LR_ROUNDING, _LR_LOG_SCALE = 1e-2, 5e-4


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _h_inverse(frac: torch.Tensor) -> torch.Tensor:
    p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _unit_input(unit: list[QNode]) -> str:
    inside = {n.name for n in unit}
    outside = {i for n in unit for i in n.inputs if i not in inside}
    assert len(outside) == 1, f"a reconstruction unit needs one input, {unit[0].name} has {sorted(outside)}"
    return outside.pop()


class _Frontier:
    """Every calibration image's values at the current point of the graph, float and fake-quant, advanced node by
    node with the weights and scales learned so far: each node runs once per mode, however many units there are
    (recomputing each unit's input from the graph input cost the square of the depth)."""

    def __init__(self, graph: QGraph, batches: list[torch.Tensor]) -> None:
        self.nodes, self.pos = graph.nodes, 0
        self.last_use = {n.name: len(graph.nodes) for n in graph.nodes}  # the output is read at the end
        for k, n in enumerate(graph.nodes):
            for i in n.inputs:
                self.last_use[i] = k if i != graph.output else len(graph.nodes)
        # one environment per calibration batch: the same batches as a whole-graph run, so the same floats
        self.fp = [{graph.nodes[0].name: x} for x in batches]
        self.q = [{graph.nodes[0].name: x} for x in batches]

    @torch.no_grad()
    def advance(self, to: int, acts: dict[str, ActQ], weights: dict[str, WeightQ]) -> None:
        for k in range(self.pos, to):
            n = self.nodes[k]
            for fp, q in zip(self.fp, self.q, strict=True):
                run_nodes([n], fp)
                run_nodes([n], q, acts, weights)
                for i in n.inputs:
                    if self.last_use[i] <= k:
                        fp.pop(i, None)
                        q.pop(i, None)
        self.pos = max(self.pos, to)

    def values(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float, fake-quant) values of `name` for every calibration image."""
        return torch.cat([e[name] for e in self.fp]), torch.cat([e[name] for e in self.q])


class _Unit(torch.nn.Module):
    """A differentiable copy of one unit: soft-rounded weights, fake-quantized (optionally learned-scale)
    activation points with QDrop mixing."""

    def __init__(self, unit: list[QNode], weights: dict[str, WeightQ], acts: dict[str, ActQ], quant_points: list[str],
                 learn_scales: bool) -> None:
        super().__init__()
        self.nodes, self.input = unit, _unit_input(unit)
        self.acts = {k: acts[k] for k in quant_points}
        self.rounding = torch.nn.ParameterDict()
        self.floor, self.scale, self.qtypes = {}, {}, {}
        for n in unit:
            if n.is_weighted:
                s = weights[n.name].scale.view(-1, *([1] * (n.weight.ndim - 1)))
                self.scale[n.name], self.floor[n.name] = s, torch.floor(n.weight / s)
                self.qtypes[n.name] = weights[n.name].qtype
                self.rounding[n.name] = torch.nn.Parameter(_h_inverse(n.weight / s - self.floor[n.name]))
        self.log_scales = torch.nn.ParameterDict({
            k: torch.nn.Parameter(torch.tensor(math.log(a.scale))) for k, a in self.acts.items()
        } if learn_scales else {})

    def soft_weight(self, name: str) -> torch.Tensor:
        qt = self.qtypes[name]
        return self.scale[name] * torch.clamp(self.floor[name] + _h(self.rounding[name]), qt.qmin, qt.qmax)

    def hard_rounding(self) -> dict[str, torch.Tensor]:
        return {k: torch.clamp(self.floor[k] + (_h(v) >= 0.5).float(), self.qtypes[k].qmin, self.qtypes[k].qmax)
                for k, v in self.rounding.items()}

    def regularizer(self, beta: float) -> torch.Tensor:
        return sum((1 - (2 * _h(v) - 1).abs().pow(beta)).sum() for v in self.rounding.values())

    def act_scale(self, name: str) -> torch.Tensor | float:
        return self.log_scales[name].exp() if name in self.log_scales else self.acts[name].scale

    def forward(self, x: torch.Tensor, gen: torch.Generator | None, soft: bool = True) -> torch.Tensor:
        vals = {self.input: x}
        for n in self.nodes:
            w, b = ((self.soft_weight(n.name) if soft else n.weight), n.bias) if n.is_weighted else (None, None)
            y = relu_clip(n, OPS.get(n.op).run_float(n, [vals[i] for i in n.inputs], w, b))
            if soft and n.name in self.acts:
                a = self.acts[n.name]
                yq = fake_quantize(y, self.act_scale(n.name), a.zero_point, a.qtype)
                # QDrop: each element keeps its unquantized value with probability 1/2
                y = torch.where(torch.rand(y.shape, generator=gen) < 0.5, y, yq) if gen is not None else yq
            vals[n.name] = y
        return vals[self.nodes[-1].name]


def _optimize(unit: _Unit, x_q: torch.Tensor, x_fp: torch.Tensor, cfg: QuantConfig, gen: torch.Generator) -> None:
    with torch.no_grad():
        target = torch.cat([unit(x_fp[i:i + 256], None, soft=False) for i in range(0, len(x_fp), 256)])
    groups = [{"params": list(unit.rounding.values()), "lr": _LR_ROUNDING}]
    if len(unit.log_scales):
        groups.append({"params": list(unit.log_scales.values()), "lr": _LR_LOG_SCALE})
    opt = torch.optim.Adam(groups)
    iters, warm = cfg.adaround_iters, int(0.2 * cfg.adaround_iters)
    for it in range(iters):
        idx = torch.randint(0, len(x_q), (cfg.adaround_batch,), generator=gen)
        xin = x_q[idx]
        if cfg.adaround_act_quant:
            keep_fp = torch.rand(xin.shape, generator=gen) < 0.5
            xin = torch.where(keep_fp, x_fp[idx], xin)
        out = unit(xin, gen if cfg.adaround_act_quant else None)
        # summed over channels (dim 1 of NCHW, the last of token rows), averaged over images, pixels and tokens
        loss = (out - target[idx]).pow(2).sum(1 if out.dim() != 3 else -1).mean()
        if it >= warm:
            beta = 2 + (20 - 2) * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm))) / 2
            loss = loss + _LAMBDA * unit.regularizer(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


_TIE_TOLERANCE = 1e-4  # steps: above the last-bit differences of backends' requantization (fixed-point ~6e-5)
_TIE_NUDGES = [k * 2.0**-12 for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 6, -6, 8, -8)]  # relative, smallest first


def away_from_ties(values: torch.Tensor, scale: float, qtype, zero_point: int) -> float:
    """The float32 scale within 0.2% of `scale` (smallest move first) that leaves the fewest of `values` (the float
    inputs of a QuantizeLinear) within _TIE_TOLERANCE steps of a rounding boundary, saturated values aside."""
    v = values.detach().flatten().double()
    best, best_count = np.float32(scale), None
    for nudge in _TIE_NUDGES:
        s = np.float32(scale * (1 + nudge))
        t = v / float(s)
        inside = (t + zero_point > qtype.qmin - 0.5) & (t + zero_point < qtype.qmax + 0.5)
        count = int(((t - torch.floor(t) - 0.5).abs()[inside] < _TIE_TOLERANCE).sum())
        if best_count is None or count < best_count:
            best, best_count = s, count
    return float(best)


def _settle_off_ties(nodes: list[QNode], x_q: torch.Tensor, names: list[str], acts: dict[str, ActQ],
                     weights: dict[str, WeightQ]) -> None:
    """Move each learned scale in `names` (graph order, each seeing the ones before it settled) off rounding
    boundaries of the calibration values reaching it (away_from_ties); `x_q` is the unit's quantized input."""
    for name in names:
        seen: list[torch.Tensor] = []

        def grab(n: str, t: torch.Tensor, name: str = name, seen: list = seen) -> None:
            if n == name:
                seen.append(t)

        with torch.no_grad():
            run_nodes(nodes, {_unit_input(nodes): x_q}, acts, weights, observe=grab)
        a = acts[name]
        acts[name] = ActQ(away_from_ties(torch.cat([t.flatten() for t in seen]), a.scale, a.qtype, a.zero_point),
                          a.zero_point, a.qtype)


@ROUNDINGS.register("adaround")
def learn_rounding(graph: QGraph, acts: dict[str, ActQ], weights: dict[str, WeightQ], calib: list[torch.Tensor],
                   cfg: QuantConfig, progress: bool = False) -> tuple[dict[str, WeightQ], dict[str, ActQ]]:
    """Replace round-to-nearest weights by learned rounding, unit by unit (earlier units first); with
    cfg.learn_act_clip the activation scales are learned too. Returns (weights, activation parameters)."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    acts = dict(acts)
    logits = graph.quant_source(graph.output)
    done: dict[str, WeightQ] = {}
    units = reconstruction_units(graph, cfg.reconstruction == "block")
    frontier = _Frontier(graph, calib)
    index = {n.name: k for k, n in enumerate(graph.nodes)}
    n_settle = sum(len(x) for x in calib[:2])  # the ties are looked for on the first two batches
    for nodes in tqdm(units, desc=f"learned rounding ({cfg.reconstruction}s)", unit=cfg.reconstruction,
                      disable=None if progress else True, leave=False):  # None: only on a terminal
        # Quantization points the unit fake-quantizes: those inside it (QDrop), and with learned clipping its
        # output as well (the logits keep their min-max range: see calibrate).
        inner = [n.name for n in nodes[:-1] if n.name in acts] if cfg.adaround_act_quant else []
        out = [nodes[-1].name] if cfg.learn_act_clip and nodes[-1].name in acts and nodes[-1].name != logits else []
        unit = _Unit(nodes, weights, acts, inner + out, cfg.learn_act_clip)
        frontier.advance(index[nodes[0].name], acts, done)
        x_fp, x_q = frontier.values(unit.input)
        with torch.enable_grad():
            _optimize(unit, x_q, x_fp, cfg, gen)
        for name, q in unit.hard_rounding().items():
            done[name] = WeightQ(q, weights[name].scale, weights[name].qtype, weights[name].bias_q,
                                 weights[name].bias_scale)
        for name, log_s in unit.log_scales.items():
            a = acts[name]
            acts[name] = ActQ(float(np.float32(math.exp(log_s.item()))), a.zero_point, a.qtype)
        if unit.log_scales:
            _settle_off_ties(nodes, x_q[:n_settle], list(unit.log_scales), acts, done)
    # The int32 biases at the final input scales (learned clipping may have moved them).
    nodes = {n.name: n for n in graph.weighted()}
    return {k: with_bias(nodes[k], w.q, w.scale, w.qtype, acts) for k, w in done.items()}, acts
