"""Post-training quantization: calibrate a captured graph and build the fake-quant reference.

The reference (FakeQuantModel) defines Plateau's numerics. Per node, in float32, exactly what the QDQ ONNX graph
computes:

    input   x_q = Q(x)                                   (per-tensor, signed int8 by default, asymmetric)
    conv    y = conv(DQ(x_q), DQ(W_q, s_w, axis 0), DQ(b_q, s_x * s_w))  [relu]  -> Q(y)
    linear  same with a matrix product
    add     y = DQ(a) + DQ(b) [relu] -> Q(y);   gap: mean over H, W -> Q(y)
    pass-through ops (maxpool, flatten, slice, zero pad, relu) act on dequantized values and stay on the grid.

Weights: per-output-channel symmetric, narrow range (-127..127 at 8 bits). Bias: int32 at scale s_x * s_w.
The logits (graph output) are always quantized at 8 bits, so argmax is not decided by ties.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plateau.errors import PlateauError
from plateau.quant import (
    QType,
    choose_qparams,
    conv_multiplier,
    dequantize,
    fake_quantize,
    mean_multiplier,
    quantize,
    requantize,
)

from .config import QuantConfig
from .float_ops import run_float_op
from .graph import QGraph, QNode, capture

__all__ = ["ActQ", "WeightQ", "FakeQuantModel", "quantize_model", "calibrate", "run_graph", "run_graph_int", "quantize_graph"]


@dataclass
class ActQ:
    scale: float  # float32 value
    zero_point: int
    qtype: QType


@dataclass
class WeightQ:
    q: torch.Tensor  # integer values held in float32, shape of the weight
    scale: torch.Tensor  # float32 [Cout]
    qtype: QType
    bias_q: torch.Tensor  # int64 values of the int32 bias
    bias_scale: torch.Tensor  # float32 [Cout] = float32(s_x * s_w)

    def weight(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, 0, axis=0)

    def bias(self) -> torch.Tensor:
        # ONNX DequantizeLinear on int32: float32(q) * scale.
        return self.bias_q.to(torch.float32) * self.bias_scale


# --- one interpreter for float, calibration and fake-quant execution -------------------------------------------------
def _apply(n: QNode, ins: list[torch.Tensor], weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    a = n.attrs
    if n.op == "conv":
        y = F.conv2d(ins[0], weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
    elif n.op == "linear":
        y = F.linear(ins[0], weight, bias)
    elif n.op == "add":
        y = ins[0] + ins[1]
    elif n.op == "mul":
        y = ins[0] * ins[1]
    elif n.op == "gap":
        y = ins[0].mean(dim=(2, 3), keepdim=True)
    elif n.op == "avgpool":
        y = F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
    elif n.op == "maxpool":
        y = F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    elif n.op == "flatten":
        y = torch.flatten(ins[0], 1)
    elif n.op == "slice":
        idx = [slice(None)] * ins[0].ndim
        for ax, s, e, st in zip(a["axes"], a["starts"], a["ends"], a["steps"], strict=False):
            idx[ax] = slice(s, e, st)
        y = ins[0][tuple(idx)]
    elif n.op == "pad":
        y = F.pad(ins[0], a["pad"])
    elif n.op == "relu":
        y = F.relu(ins[0])
    elif n.op == "cat":
        y = torch.cat(ins, dim=a["dim"])
    elif n.op == "float":
        y = run_float_op(a["kind"], a["params"], ins[0])
    else:
        raise AssertionError(n.op)
    y = F.relu(y) if n.relu else y
    if "clip" in a:
        y = torch.clamp(y, *a["clip"])
    return y


def clip_range(n: QNode, a: ActQ) -> tuple[int, int]:
    """The integer bounds of a fused ReLU6 / Hardtanh: [Q(lo), Q(hi)] (quantize is monotone, so quantizing the
    clamped value equals clamping the quantized one to these)."""
    lo, hi = n.attrs["clip"]
    q = quantize(torch.tensor([lo, hi], dtype=torch.float32), np.float32(a.scale), a.zero_point, a.qtype)
    return int(q[0]), int(q[1])


def run_graph(
    graph: QGraph,
    x: torch.Tensor,
    acts: dict[str, ActQ] | None = None,
    weights: dict[str, WeightQ] | None = None,
    observe=None,
    keep: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Execute the graph: float when acts/weights are None, fake-quant otherwise.

    observe(name, tensor) sees every quantization point's float value; keep=True returns all node outputs.
    """
    vals: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        if n.op == "input":
            y = x
        else:
            w = b = None
            if n.is_weighted:
                if weights is not None and n.name in weights:
                    w, b = weights[n.name].weight(), weights[n.name].bias()
                else:
                    w, b = n.weight, n.bias
            y = _apply(n, [vals[i] for i in n.inputs], w, b)
        if n.quantized_output:
            if observe is not None:
                observe(n.name, y)
            if acts is not None and n.name in acts:
                q = acts[n.name]
                y = fake_quantize(y, q.scale, q.zero_point, q.qtype)
        vals[n.name] = y
    return vals if keep else vals[graph.output]


def _requant_float(y: torch.Tensor, a: ActQ) -> torch.Tensor:
    """Q(y) of a float32 value: saturate(round(y / s) + zp), ONNX QuantizeLinear."""
    return quantize(y.to(torch.float32), np.float32(a.scale), a.zero_point, a.qtype)


def _deq(q: torch.Tensor, a: ActQ) -> torch.Tensor:
    """DQ(q) in float32: float32(q - zp) * s."""
    return (q - a.zero_point).to(torch.float32) * np.float32(a.scale)


def _exact_dtype(n: QNode, xin: torch.Tensor, w: WeightQ) -> torch.dtype:
    """float32 when every partial sum of integer products stays below 2^24 (then float32 sums are exact and much
    faster), float64 otherwise."""
    k = w.q[0].numel()
    bound = k * float(xin.abs().max()) * float(w.q.abs().max())
    return torch.float32 if bound < 2**24 else torch.float64


@torch.no_grad()
def run_graph_int(graph: QGraph, x: torch.Tensor, acts: dict[str, ActQ], weights: dict[str, WeightQ],
                  keep: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """The reference numerics: integers carried between nodes (float64 tensors holding exact integers).

    conv/linear: exact integer accumulation of (q_x - z_x) * q_w plus the int32 bias, then
        requantize(acc, float32(float32(s_x * s_w) / s_y))            -- as integer kernels compute it
    gap:  exact integer sum over H*W, then requantize with float32(s_x / (s_y * H * W))
    avgpool (ceil_mode off): exact integer window sums, then requantize with float32(s_x) / (float32(s_y) * K), K the
        window size (count_include_pad) or each window's in-bounds count     -- as GAP, per output position
    add/mul/cat/float islands (and avgpool with ceil_mode): DQ in float32, the float32 op, Q   -- ONNX float semantics
    pass-through ops act on integers (zero padding pads with the zero point, ReLU clamps at it).
    Returns dequantized logits, or with keep=True the integer outputs of every quantization point.
    """
    qv: dict[str, torch.Tensor] = {}  # node -> integer tensor (float64)
    qa: dict[str, ActQ] = {}  # node -> the quantization it carries
    for n in graph.nodes:
        if n.op == "input":
            a = acts[n.name]
            qv[n.name], qa[n.name] = _requant_float(x, a).double(), a
            continue
        ins = [qv[i] for i in n.inputs]
        ain = [qa[i] for i in n.inputs]
        a = acts.get(n.name, ain[0] if ain else None)
        at = n.attrs
        if n.op in ("conv", "linear"):
            w = weights[n.name]
            xin = ins[0] - ain[0].zero_point
            dt = _exact_dtype(n, xin, w)
            if n.op == "conv":
                acc = F.conv2d(xin.to(dt), w.q.to(dt), None, at["stride"], at["padding"], at["dilation"],
                               at["groups"]).double()
                acc = acc + w.bias_q.double().view(1, -1, 1, 1)
            else:
                acc = F.linear(xin.to(dt), w.q.to(dt)).double() + w.bias_q.double()
            m = torch.from_numpy(conv_multiplier(ain[0].scale, w.scale.numpy(), a.scale))
            y = requantize(acc, m, a.zero_point, a.qtype, relu=n.relu, axis=1)
            if "clip" in at:
                y = torch.clamp(y, *clip_range(n, a))
        elif n.op == "gap":
            acc = (ins[0] - ain[0].zero_point).sum(dim=(2, 3), keepdim=True)
            count = ins[0].shape[2] * ins[0].shape[3]
            m = torch.from_numpy(mean_multiplier(ain[0].scale, a.scale, count))
            y = requantize(acc, m, a.zero_point, a.qtype, axis=None)
        elif n.op == "avgpool" and not at["ceil_mode"]:
            xin = ins[0] - ain[0].zero_point
            k, st, pad = at["kernel"], at["stride"], at["padding"]
            # divisor 1: the exact window sums (zero padding is the zero point, 0 once centred)
            acc = F.avg_pool2d(xin, k, st, pad, count_include_pad=True, divisor_override=1)
            if at["count_include_pad"]:
                count = np.float32(k[0] * k[1])
            else:
                ones = torch.ones(1, 1, *xin.shape[2:], dtype=torch.float64)
                count = F.avg_pool2d(ones, k, st, pad, count_include_pad=True, divisor_override=1)[0, 0].numpy()
            m = torch.from_numpy(mean_multiplier(ain[0].scale, a.scale, count))
            y = requantize(acc, m, a.zero_point, a.qtype, axis=None)
        elif n.op in ("add", "mul", "avgpool", "cat", "float"):
            f = _apply(n, [_deq(t, ai) for t, ai in zip(ins, ain, strict=False)], None, None)
            y = _requant_float(f, a)
        elif n.op in ("maxpool", "flatten", "slice"):  # exact on integers
            y = _apply(n, ins, None, None)
        elif n.op == "pad":
            y = F.pad(ins[0], at["pad"], value=float(ain[0].zero_point))
        elif n.op == "relu":
            y = torch.clamp(ins[0], min=float(ain[0].zero_point))
        else:
            raise AssertionError(n.op)
        qv[n.name], qa[n.name] = y.double(), a
    if keep:
        return {k: v for k, v in qv.items() if k in acts}
    return _deq(qv[graph.output], qa[graph.output])


# --- calibration -------------------------------------------------------------------------------------------------------
class _Observer:
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
        lo, hi = self._range()
        h = torch.histc(t.detach().float().flatten(), self.BINS, lo, hi)
        self.hist = h if self.hist is None else self.hist + h

    def _range(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        return lo, hi if hi > lo else lo + 1e-8

    def clip(self, method: str, qtype: QType, percentile: float) -> tuple[float, float]:
        lo, hi = self._range()
        if method == "minmax" or self.hist is None:
            return lo, hi
        h = self.hist.double().numpy()
        edges = np.linspace(lo, hi, self.BINS + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        if method == "percentile":
            cdf = np.cumsum(h) / max(h.sum(), 1.0)
            p = percentile / 100.0
            c_lo = edges[np.searchsorted(cdf, 1.0 - p)] if lo < 0 else 0.0
            c_hi = edges[min(np.searchsorted(cdf, p) + 1, self.BINS)]
            return min(float(c_lo), 0.0), max(float(c_hi), 1e-8)
        if method == "kl":
            return _kl_clip(h, edges, qtype)
        # mse: shrink the range by a common factor, keep the one with the least expected squared error.
        best, best_err = (lo, hi), float("inf")
        for r in np.linspace(0.2, 1.0, 81):
            s, z = choose_qparams(lo * r, hi * r, qtype, symmetric=False)
            q = np.clip(np.rint(centers / s) + z, qtype.qmin, qtype.qmax)
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


def _kl_clip(h: np.ndarray, edges: np.ndarray, qtype: QType) -> tuple[float, float]:
    """KL-entropy calibration: the clipping range whose quantized histogram diverges least from the observed one.

    The upper end is searched first (lower end at the minimum), then the lower end with that upper end; each over
    a geometric grid from `levels` bins in range up to all of them. A range that starts at 0 (ReLU) keeps lo = 0.
    """
    levels, nb = qtype.levels + 1, len(h)
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


def _act_bits(graph: QGraph, cfg: QuantConfig) -> dict[str, int]:
    """Activation bits per quantization point: the configured width, 8 at the logits, and 8 around the first and
    last weighted layers when keep_first_last_8bit is set."""
    bits = {n.name: cfg.act_bits for n in graph.nodes if n.quantized_output}
    bits[graph.quant_source(graph.output)] = 8
    if cfg.keep_first_last_8bit:
        w = graph.weighted()
        bits[graph.quant_source(w[0].inputs[0])] = 8
        bits[graph.quant_source(w[-1].inputs[0])] = 8
    return bits


def weight_bits(graph: QGraph, cfg: QuantConfig) -> dict[str, int]:
    w = graph.weighted()
    bits = {n.name: cfg.weight_bits for n in w}
    if cfg.keep_first_last_8bit:
        bits[w[0].name] = 8
        bits[w[-1].name] = 8
    by_module = {n.module: n.name for n in w}
    for key, b in cfg.layer_bits.items():
        name = by_module.get(key, key if key in bits else None)
        if name is None:
            raise PlateauError(f"layer_bits names {key!r}, which is not a conv/linear layer; layers: "
                               f"{', '.join(n.module or n.name for n in w)}")
        bits[name] = b
    return bits


@torch.no_grad()
def calibrate(graph: QGraph, calib: Iterable[torch.Tensor], cfg: QuantConfig) -> dict[str, ActQ]:
    """Activation quantization parameters from calibration batches (float forward, streamed statistics)."""
    batches = [x for x in calib]
    if not batches or sum(len(x) for x in batches) == 0:
        raise PlateauError("calibration set is empty: give at least one image (--calib-images)")
    obs: dict[str, _Observer] = {}

    def see_range(name: str, t: torch.Tensor) -> None:
        obs.setdefault(name, _Observer()).update_range(t)

    for x in batches:
        run_graph(graph, x, observe=see_range)
    if cfg.act_calibration != "minmax":
        for x in batches:
            run_graph(graph, x, observe=lambda name, t: obs[name].update_hist(t))
    bits = _act_bits(graph, cfg)
    logits = graph.quant_source(graph.output)
    acts = {}
    for name, o in obs.items():
        qt = cfg.act_qtype(bits[name])
        # The logits keep their whole range: clipping them would make the argmax a tie.
        lo, hi = o.clip("minmax" if name == logits else cfg.act_calibration, qt, cfg.percentile)
        s, z = choose_qparams(lo, hi, qt, symmetric=False)
        acts[name] = ActQ(float(s), int(z), qt)
    return acts


def weight_scales(w: torch.Tensor, qtype: QType, method: str) -> torch.Tensor:
    """Per-output-channel symmetric scales; 'mse' searches a clipping ratio per channel."""
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(1).clamp_min(1e-12)
    if method == "minmax":
        return (amax / qtype.qmax).float()
    best_s = amax / qtype.qmax
    best_err = torch.full_like(amax, float("inf"))
    for r in torch.linspace(0.5, 1.0, 51):
        s = amax * r / qtype.qmax
        q = torch.clamp(torch.round(flat / s[:, None]), qtype.qmin, qtype.qmax)
        err = ((q * s[:, None] - flat) ** 2).sum(1)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s.float()


def quantize_weights(graph: QGraph, acts: dict[str, ActQ], cfg: QuantConfig) -> dict[str, WeightQ]:
    wbits = weight_bits(graph, cfg)
    out = {}
    for n in graph.weighted():
        qt = cfg.weight_qtype(wbits[n.name])
        s_w = weight_scales(n.weight, qt, cfg.weight_calibration)
        q = quantize(n.weight, s_w, 0, qt, axis=0)
        out[n.name] = _with_bias(n, q, s_w, qt, acts)
    return out


def _with_bias(n: QNode, q: torch.Tensor, s_w: torch.Tensor, qt: QType, acts: dict[str, ActQ]) -> WeightQ:
    s_x = torch.tensor(acts[n.attrs["_in_q"]].scale, dtype=torch.float32)
    s_b = (s_x * s_w).to(torch.float32)
    b_q = torch.clamp(torch.round(n.bias.double() / s_b.double()), -(2**31), 2**31 - 1).to(torch.int64)
    return WeightQ(q, s_w, qt, b_q, s_b)


class FakeQuantModel(nn.Module):
    """The fake-quant reference: a graph plus its quantization parameters, callable like the original model."""

    def __init__(self, graph: QGraph, acts: dict[str, ActQ], weights: dict[str, WeightQ], cfg: QuantConfig,
                 cfg_model: dict | None = None) -> None:
        super().__init__()
        self.graph, self.acts, self.weights, self.cfg = graph, acts, weights, cfg
        self.model_cfg = cfg_model or {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference logits: integer-exact accumulation, float32 requantization (see run_graph_int)."""
        return run_graph_int(self.graph, x, self.acts, self.weights)

    @torch.no_grad()
    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """Float fake-quant (dequantized weights, float convolutions): equal to forward up to rare ties."""
        return run_graph(self.graph, x, self.acts, self.weights)

    @torch.no_grad()
    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The BN-folded float model (the FP baseline)."""
        return run_graph(self.graph, x)

    @torch.no_grad()
    def intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every quantization point's integer output, for per-layer comparison with a device."""
        return run_graph_int(self.graph, x, self.acts, self.weights, keep=True)

    @property
    def output_step(self) -> float:
        return self.acts[self.graph.quant_source(self.graph.output)].scale


def prepare(model: nn.Module, input_shape: list[int], allow_float: bool = False) -> QGraph:
    graph = capture(model, input_shape, allow_float)
    for n in graph.weighted():
        n.attrs["_in_q"] = graph.quant_source(n.inputs[0])
    return graph


def quantize_graph(graph: QGraph, calib: Iterable[torch.Tensor], cfg: QuantConfig, progress: bool = False,
                   model_cfg: dict | None = None) -> FakeQuantModel:
    """quantize_model for a graph that did not come from torch (e.g. read from an FP32 ONNX file)."""
    for n in graph.weighted():
        n.attrs["_in_q"] = graph.quant_source(n.inputs[0])
    batches = [x for x in calib]
    acts = calibrate(graph, batches, cfg)
    weights = quantize_weights(graph, acts, cfg)
    if cfg.rounding == "adaround":
        from .adaround import learn_rounding

        weights, acts = learn_rounding(graph, acts, weights, batches, cfg, progress=progress)
    return FakeQuantModel(graph, acts, weights, cfg, model_cfg)


def quantize_model(model: nn.Module, calib: Iterable[torch.Tensor], cfg: QuantConfig,
                   input_shape: list[int] | None = None, progress: bool = False) -> FakeQuantModel:
    """Fold BN, calibrate activations, quantize weights (rounding to nearest or learned) -> the reference model.

    >>> ref = quantize_model(model, [x_calib], QuantConfig.from_bits("W8A8"))
    >>> logits = ref(x)
    """
    from plateau.models import model_cfg

    mcfg = model_cfg(model)
    shape = input_shape or [1, *mcfg["input_size"]]
    return quantize_graph(prepare(model, shape, cfg.allow_float), calib, cfg, progress, mcfg)
