"""Calibration: activation ranges from calibration images, weight scales, and round-to-nearest weights, by the
methods of plateau/calibrators.py; `quantize_nearest` is the whole of the simplest PTQ (what training reports as
the quantization gap; `plateau export` adds learned rounding on top).

    >>> acts = calibrate(graph, calib_batches, QuantConfig.from_bits("W4A8", act_calibration="mse"))
    >>> weights = quantize_weights(graph, acts, cfg)          # round to nearest; learned rounding starts here
    >>> ref = quantize_nearest(model, calib_batches, QuantConfig.from_bits("W4A4"))
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from plateau.calibrators import ACT_CALIBRATORS, Observer, weight_scales
from plateau.capture import capture
from plateau.errors import PlateauError
from plateau.models import model_cfg
from plateau.ops.island_forms import SOFTMAX_FORMS, integer_forms
from plateau.qconfig import QuantConfig
from plateau.qgraph import ActQ, QGraph, QNode, WeightQ
from plateau.quant import QType, choose_qparams, quantize, quantize_bias
from plateau.reference import FakeQuantModel, run_graph

__all__ = ["calibrate", "act_bits", "weight_bits", "weight_scales", "quantize_weights", "with_bias",
           "quantize_nearest"]


_KERNEL_OPS = ("conv", "linear", "matmul", "gap", "avgpool", "mean")


def kernel_inputs(graph: QGraph) -> set[str]:
    """The quantization points an integer kernel reads (conv, linear, matmul, an average), and those summed into
    one (a ResNet's residual branch): the points whose width is the kernels' activation width. A transformer's
    residual stream, read by LayerNorm and the next sum only, is not one."""
    low = {graph.quant_source(i) for n in graph.nodes if n.op in _KERNEL_OPS for i in n.inputs}
    for n in reversed(graph.nodes):  # readers come after what they read: one backward pass reaches a fixed point
        if n.op in ("add", "mul", "cat") and n.name in low:
            low.update(graph.quant_source(i) for i in n.inputs)
    return low


def act_bits(graph: QGraph, cfg: QuantConfig) -> dict[str, int]:
    """Activation bits per quantization point: the configured width where an integer kernel (conv, linear,
    matmul, average) reads it (act_bits_scope "kernel-inputs"; "all": everywhere), else 8 (a transformer's
    residual stream and the inputs of its LayerNorm, Softmax and GELU: no integer kernel reads them, and they
    carry the outliers; a CNN has none such);
    probability_bits for attention probabilities; 8 at the logits, for constants (a position embedding) and
    around the first and last weighted layers when keep_first_last_8bit is set."""
    low = kernel_inputs(graph) if cfg.act_bits_scope == "kernel-inputs" else None
    bits = {n.name: 8 if n.op == "const" or (low is not None and n.name not in low) else cfg.act_bits
            for n in graph.nodes if n.quantized_output}
    for p in probability_points(graph):
        bits[p] = cfg.probability_bits
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


def probability_points(graph: QGraph) -> set[str]:
    """The outputs of Softmax islands (attention probabilities): values in [0, 1] whose grid needs no calibration."""
    return {n.name for n in graph.nodes if n.attrs.get("kind") == "softmax" and n.op in SOFTMAX_FORMS}


def probability_qparams(bits: int) -> ActQ:
    """The grid of a probability: unsigned, zero point 0, scale 2^-bits (so 1 / scale is an exact integer).

    Unsigned whatever the other activations are: the attention scores before it stay int8, so onnxruntime, which
    fuses DequantizeLinear -> Softmax -> QuantizeLinear only between one 8-bit type, runs the float Softmax the
    graph means rather than its QLinearSoftmax (a lookup table; its int8 output wraps a probability of 1 round
    to -128)."""
    qt = QType(bits, signed=False)
    return ActQ(float(np.float32(2.0**-bits)), 0, qt)


@torch.no_grad()
def calibrate(graph: QGraph, calib: Iterable[torch.Tensor], cfg: QuantConfig) -> dict[str, ActQ]:
    """Activation quantization parameters from calibration batches (float forward, streamed statistics)."""
    batches = [x for x in calib]
    if not batches or sum(len(x) for x in batches) == 0:
        raise PlateauError("calibration set is empty: give at least one image (--calib-images)")
    obs: dict[str, Observer] = {}

    def see_range(name: str, t: torch.Tensor) -> None:
        obs.setdefault(name, Observer()).update_range(t)

    for x in batches:
        run_graph(graph, x, observe=see_range)
    method = ACT_CALIBRATORS.get(cfg.act_calibration)
    if method.histogram:
        for x in batches:
            run_graph(graph, x, observe=lambda name, t: obs[name].update_hist(t))
    bits = act_bits(graph, cfg)
    logits = graph.quant_source(graph.output)
    probabilities = probability_points(graph)
    acts = {}
    for name, o in obs.items():
        if name in probabilities and name != logits:
            acts[name] = probability_qparams(bits[name])
            continue
        qt = cfg.act_qtype(bits[name])
        # The logits keep their whole range: clipping them would make the argmax a tie.
        lo, hi = o.range() if name == logits else method.clip(o, qt, cfg.percentile)
        s, z = choose_qparams(lo, hi, qt, symmetric=False)
        acts[name] = ActQ(float(s), int(z), qt)
    return acts


def with_bias(n: QNode, q: torch.Tensor, s_w: torch.Tensor, qt: QType, acts: dict[str, ActQ]) -> WeightQ:
    """A layer's WeightQ: its integer weight and its int32 bias at the scale of its input (quant.quantize_bias)."""
    b_q, s_b = quantize_bias(n.bias, acts[n.attrs["_in_q"]].scale, s_w)
    return WeightQ(q, s_w, qt, b_q, s_b)


def quantize_weights(graph: QGraph, acts: dict[str, ActQ], cfg: QuantConfig) -> dict[str, WeightQ]:
    """Round-to-nearest integer weights of every conv/linear layer, at its bits and calibrated scales."""
    wbits = weight_bits(graph, cfg)
    out = {}
    for n in graph.weighted():
        qt = cfg.weight_qtype(wbits[n.name])
        s_w = weight_scales(n.weight, qt, cfg.weight_calibration)
        out[n.name] = with_bias(n, quantize(n.weight, s_w, 0, qt, axis=0), s_w, qt, acts)
    return out


def quantize_nearest(model: nn.Module, calib: Iterable[torch.Tensor], cfg: QuantConfig) -> FakeQuantModel:
    """The reference of `model` with calibrated activations and round-to-nearest weights (cfg.rounding ignored)."""
    mcfg = model_cfg(model)
    graph = capture(model, [1, *mcfg["input_size"]], cfg.allow_float)
    integer_forms(graph, cfg)
    batches = [x for x in calib]
    acts = calibrate(graph, batches, cfg)
    return FakeQuantModel(graph, acts, quantize_weights(graph, acts, cfg), cfg, mcfg)
