"""Quantization-aware training on the graph `plateau export` writes, in the reference numerics.

A trained model is captured once (BatchNorm folded into its convolutions exactly as export folds it, so BN is
frozen at its trained statistics) and calibrated (the activation grids and round-to-nearest weight scales of the
PTQ reference). QATNet then trains that graph's own tensors:

    weights   the folded float weights and biases of every conv/linear layer
    s_w       the per-output-channel weight scales (symmetric, narrow range, as the reference)
    s_a       every activation quantization point's scale (LSQ), the zero point fixed from calibration

Its forward is the reference's float fake-quant (plateau.reference.run_nodes): quant.fake_quantize at every
quantization point and on every weight (round half to even, saturation, straight-through gradient inside the
range), the int32 bias rounded at float32(s_x * s_w). Scale gradients are scaled by 1 / sqrt(N * Q_p) (LSQ).
Attention probabilities keep their fixed 2^-bits grid (nothing to learn: [0, 1] is known).

`to_reference()` turns the learned tensors into the FakeQuantModel export writes: weights quantized at the learned
scales, biases at the learned input scale, activation scales as they are (no re-calibration). That reference's
integer forward (what every compiled target is held to) equals the training forward up to float-accumulation ties;
the report gives both.

The FP model stays inside as the teacher: the same graph run in float with the original folded weights
(`teacher`), so distillation, consistency and intervention need no second model object.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from plateau.calibrate import act_bits, probability_points, probability_qparams, quantize_nearest, weight_bits
from plateau.capture import capture
from plateau.data import ImageSet
from plateau.errors import PlateauError
from plateau.models import model_cfg, rebuild_model
from plateau.ops.base import relu_clip
from plateau.ops.island_forms import integer_forms
from plateau.qconfig import QuantConfig
from plateau.qgraph import ActQ, QGraph, WeightQ, reconstruction_units
from plateau.quant import QType, fake_quantize, quantize, quantize_bias, round_ste
from plateau.reference import FakeQuantModel, run_graph, run_nodes

from .evaluate import evaluate
from .qat_bn import batch_stat_conv, conv_bn_pairs, fold

__all__ = ["QATNet", "build_qat", "qat_quant_config", "qat_gap", "QAT_FORMAT"]

QAT_FORMAT = 1  # the layout of a checkpoint's "qat" entry
_MIN_SCALE = 1e-8


class _GradScale(torch.autograd.Function):
    """Identity forward (the scale's value is untouched, bit for bit); gradient times g backward (LSQ)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, g: float) -> torch.Tensor:  # noqa: D102
        ctx.g = g
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad * ctx.g, None


class _LiveAct:
    """An ActQ whose scale is a tensor in the autograd graph (what run_nodes' fake_quantize reads)."""

    def __init__(self, scale: torch.Tensor | float, zero_point: int, qtype: QType) -> None:
        self.scale, self.zero_point, self.qtype = scale, zero_point, qtype


class _LiveWeight:
    """A WeightQ-like view of a layer's learned tensors: fake-quantized weight, bias rounded at s_x * s_w."""

    def __init__(self, w: torch.Tensor, s_w: torch.Tensor, qtype: QType, b: torch.Tensor,
                 s_x: torch.Tensor) -> None:
        self.w, self.s_w, self.qtype, self.b, self.s_x = w, s_w, qtype, b, s_x

    def weight(self) -> torch.Tensor:
        return fake_quantize(self.w, self.s_w, 0, self.qtype, axis=0)

    def bias(self) -> torch.Tensor:
        s_b = (self.s_x.detach() * self.s_w.detach()).to(torch.float32)
        return round_ste(self.b / s_b) * s_b


def qat_quant_config(bits: str, keep_first_last_8bit: bool) -> QuantConfig:
    """The QuantConfig QAT trains and export writes: MSE-calibrated starting grids (min-max wastes most of a 2-
    to 4-bit grid on outliers), float islands allowed (a transformer's LayerNorm/Softmax/GELU in their exact
    forms)."""
    return QuantConfig.from_bits(bits, keep_first_last_8bit=keep_first_last_8bit, allow_float=True,
                                 act_calibration="mse", weight_calibration="mse")


class QATNet(nn.Module):
    """The captured graph with learnable weights and scales; forward = the reference's float fake-quant."""

    def __init__(self, graph: QGraph, qcfg: QuantConfig, acts: dict[str, ActQ], w_scales: dict[str, torch.Tensor],
                 plateau_cfg: dict, name: str, bn: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.graph, self.qcfg = graph, qcfg
        self.plateau_cfg, self.plateau_name = plateau_cfg, name
        self.source_state: dict[str, torch.Tensor] = {}  # the FP model's state dict (set by build_qat)
        self.fixed = {p: acts[p] for p in probability_points(graph) if p in acts}
        abits, wbits = act_bits(graph, qcfg), weight_bits(graph, qcfg)
        self.act_qtype = {k: qcfg.act_qtype(abits[k]) for k in acts if k not in self.fixed}
        self.w_qtype = {n.name: qcfg.weight_qtype(wbits[n.name]) for n in graph.weighted()}
        bad = [k for k in [*acts, *self.w_qtype] if "." in k]
        if bad:
            raise PlateauError(f"graph node name {bad[0]!r} cannot name a parameter (it holds a '.')")
        # a conv with a BatchNorm (qat_bn.py) learns its raw weight and bias, gamma and beta; the others the folded
        bn = bn or {}
        self.bn_eps = {k: float(v["eps"]) for k, v in bn.items()}
        self.bn_frozen = not bn  # set by the QAT step from --qat-bn-freeze
        raw = {k: (v["w"], v["b"]) for k, v in bn.items()}
        self.w = nn.ParameterDict({n.name: nn.Parameter(raw.get(n.name, (n.weight, n.bias))[0].detach().clone())
                                   for n in graph.weighted()})
        self.b = nn.ParameterDict({n.name: nn.Parameter(raw.get(n.name, (n.weight, n.bias))[1].detach().clone())
                                   for n in graph.weighted()})
        self.bn_g = nn.ParameterDict({k: nn.Parameter(v["gamma"].detach().clone()) for k, v in bn.items()})
        self.bn_b = nn.ParameterDict({k: nn.Parameter(v["beta"].detach().clone()) for k, v in bn.items()})
        for k, v in bn.items():
            self.register_buffer(f"bn_mean_{k}", v["mean"].detach().clone())
            self.register_buffer(f"bn_var_{k}", v["var"].detach().clone())
        self.sw = nn.ParameterDict({k: nn.Parameter(torch.as_tensor(s, dtype=torch.float32).clone())
                                    for k, s in w_scales.items()})
        self.sa = nn.ParameterDict({k: nn.Parameter(torch.tensor(acts[k].scale, dtype=torch.float32))
                                    for k in self.act_qtype})
        for k in self.act_qtype:  # zero points: fixed, but saved with the state (a resumed run keeps them)
            self.register_buffer(f"za_{k}", torch.tensor(acts[k].zero_point, dtype=torch.int64))
        # LSQ's gradient scale 1 / sqrt(N * Q_p): N the elements one scale covers (one image's feature map)
        self.w_grad_scale = {k: 1.0 / math.sqrt(self.w[k][0].numel() * qt.qmax) for k, qt in self.w_qtype.items()}
        self.a_grad_scale: dict[str, float] = {}
        blocks = reconstruction_units(graph, per_block=True)
        out = graph.quant_source(graph.output)
        self.taps = [u[-1].name for u in blocks if u[-1].name != out and u[-1].quantized_output]
        self.feature_point = graph.weighted()[-1].inputs[0]  # what the classifier reads

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN202 - nn.Module's signature
        """.to(device) moves the graph's own tensors (the FP weights the teacher runs, constants) as well."""
        super()._apply(fn, recurse)

        def move(v: object) -> object:
            if isinstance(v, torch.Tensor):
                return fn(v)
            return {k: move(u) for k, u in v.items()} if isinstance(v, dict) else v

        for n in self.graph.nodes:
            n.weight, n.bias, n.attrs = move(n.weight), move(n.bias), move(n.attrs)
        return self

    # --- the learned quantization ---------------------------------------------------------------------------
    def zero_point(self, k: str) -> int:
        return int(getattr(self, f"za_{k}"))

    def _acts(self) -> dict[str, _LiveAct]:
        acts: dict[str, _LiveAct] = {k: _LiveAct(a.scale, a.zero_point, a.qtype) for k, a in self.fixed.items()}
        for k, qt in self.act_qtype.items():
            s = self.sa[k]
            if self.training and k in self.a_grad_scale:
                s = _GradScale.apply(s, self.a_grad_scale[k])
            acts[k] = _LiveAct(s, self.zero_point(k), qt)
        return acts

    def _weights(self, acts: dict[str, _LiveAct]) -> dict[str, _LiveWeight]:
        out = {}
        for n in self.graph.weighted():
            s = self.sw[n.name]
            if self.training:
                s = _GradScale.apply(s, self.w_grad_scale[n.name])
            s_x = torch.as_tensor(acts[n.attrs["_in_q"]].scale, dtype=torch.float32)
            w, b = self.folded(n.name)
            out[n.name] = _LiveWeight(w, s, self.w_qtype[n.name], b, s_x)
        return out

    def folded(self, k: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k's weight and bias as export folds them (BatchNorm at its running statistics)."""
        if k not in self.bn_eps:
            return self.w[k], self.b[k]
        return fold(self.w[k], self.b[k], self.bn_g[k], self.bn_b[k], getattr(self, f"bn_mean_{k}"),
                    getattr(self, f"bn_var_{k}"), self.bn_eps[k])

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep every scale positive after an optimizer step (a step can overshoot zero)."""
        for p in [*self.sw.values(), *self.sa.values()]:
            p.clamp_(min=_MIN_SCALE)

    # --- forwards ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, taps: bool = False, replace: dict[str, torch.Tensor] | None = None,
                mix: float = 0.0, feature_noise: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """Fake-quant logits. taps=True also returns {block output: value, "features": classifier input}.
        `replace` (teacher intervention) moves each tapped block output the fraction `mix` of the way to the given
        value; `feature_noise` (FPQ) multiplies tapped block outputs by 1 + feature_noise * N(0, 1) in training."""
        if not self.a_grad_scale:
            self._measure_sizes(x)
        acts = self._acts()
        weights = self._weights(acts)
        env: dict[str, torch.Tensor] = {self.graph.nodes[0].name: x}
        tapped: dict[str, torch.Tensor] = {}
        tap_set = set(self.taps)
        batch_bn = self.training and not self.bn_frozen
        for n in self.graph.nodes:
            if batch_bn and n.name in self.bn_eps:
                k, a = n.name, acts[n.name]
                y = batch_stat_conv(env[n.inputs[0]], weights[k].weight(), n.attrs, self.bn_g[k], self.bn_b[k],
                                    getattr(self, f"bn_mean_{k}"), getattr(self, f"bn_var_{k}"), self.bn_eps[k])
                env[k] = fake_quantize(relu_clip(n, y), a.scale, a.zero_point, a.qtype)
            else:
                run_nodes([n], env, acts, weights)
            if n.name not in tap_set:
                continue
            tapped[n.name] = env[n.name]
            if replace is not None and mix > 0 and n.name in replace:
                env[n.name] = env[n.name] + mix * (replace[n.name] - env[n.name])
            if feature_noise > 0 and self.training:
                env[n.name] = env[n.name] * (1.0 + feature_noise * torch.randn_like(env[n.name]))
        logits = env[self.graph.output]
        if not taps:
            return logits
        tapped["features"] = env[self.feature_point]
        return logits, tapped

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The FP model (the graph in float with its original folded weights): logits and the same taps."""
        env = {self.graph.nodes[0].name: x}
        run_nodes(self.graph.nodes, env)
        tapped = {k: env[k] for k in self.taps}
        tapped["features"] = env[self.feature_point]
        return env[self.graph.output], tapped

    @torch.no_grad()
    def _measure_sizes(self, x: torch.Tensor) -> None:
        """Each activation scale's N for LSQ's gradient scale: the elements of one image at that point."""
        sizes: dict[str, int] = {}
        run_graph(self.graph, x[:1], observe=lambda k, t: sizes.setdefault(k, t[0].numel()))
        self.a_grad_scale = {k: 1.0 / math.sqrt(sizes.get(k, 1) * max(1, qt.qmax)) for k, qt in self.act_qtype.items()}

    # --- what export writes -----------------------------------------------------------------------------------
    @torch.no_grad()
    def to_reference(self) -> FakeQuantModel:
        """The learned model as the reference: integer weights at the learned scales, int32 biases at
        float32(s_x * s_w), activation scales as learned (float32 values); the graph keeps the FP weights (the
        reference's float_forward is the FP model)."""
        acts = dict(self.fixed)
        for k, qt in self.act_qtype.items():
            acts[k] = ActQ(float(self.sa[k].detach().cpu()), self.zero_point(k), qt)
        weights = {}
        for n in self.graph.weighted():
            qt, s_w = self.w_qtype[n.name], self.sw[n.name].detach().cpu().to(torch.float32)
            w, b = (t.detach().cpu() for t in self.folded(n.name))
            q = quantize(w, s_w, 0, qt, axis=0)
            b_q, s_b = quantize_bias(b, acts[n.attrs["_in_q"]].scale, s_w)
            weights[n.name] = WeightQ(q, s_w, qt, b_q, s_b)
        return FakeQuantModel(self.graph, acts, weights, self.qcfg, self.plateau_cfg)

    def checkpoint_extra(self) -> dict:
        """The "qat" entry of a training checkpoint: what rebuilds this net (with the state dict) in export."""
        return {"format": QAT_FORMAT, "quant_config": self.qcfg.to_dict(), "source": self.source_state,
                "bn_batch_statistics": bool(self.bn_eps)}

    def source_model(self) -> nn.Module:
        """The FP model QAT started from, rebuilt from its saved state (what export's reference.pt records)."""
        num_classes = int(self.graph.weighted()[-1].weight.shape[0])
        model = rebuild_model(self.plateau_name, num_classes, self.plateau_cfg)
        model.load_state_dict(self.source_state)
        return model.eval()

    @classmethod
    def from_state(cls, source: nn.Module, qcfg: QuantConfig, state: dict[str, torch.Tensor],
                   bn_batch_statistics: bool = False) -> QATNet:
        """Rebuild a trained net from its FP source model, its QuantConfig and its state dict (export's way in)."""
        mcfg = model_cfg(source)
        graph = capture(source.eval(), [1, *mcfg["input_size"]], qcfg.allow_float)
        integer_forms(graph, qcfg)
        probs = probability_points(graph)
        abits = act_bits(graph, qcfg)
        acts: dict[str, ActQ] = {}
        for n in graph.nodes:
            if not n.quantized_output:
                continue
            if n.name in probs:
                acts[n.name] = probability_qparams(abits[n.name])
            elif f"sa.{n.name}" in state and f"za_{n.name}" in state:
                acts[n.name] = ActQ(float(state[f"sa.{n.name}"]), int(state[f"za_{n.name}"]),
                                    qcfg.act_qtype(abits[n.name]))
        scales = {n.name: state[f"sw.{n.name}"] for n in graph.weighted() if f"sw.{n.name}" in state}
        try:
            net = cls(graph, qcfg, acts, scales, mcfg, getattr(source, "plateau_name", type(source).__name__),
                      bn_of(source, graph) if bn_batch_statistics else None)
            net.load_state_dict(state)
            net.source_state = source.state_dict()
        except (KeyError, RuntimeError) as e:
            raise PlateauError(f"the QAT state does not fit the model's graph ({str(e).splitlines()[0][:200]})") \
                from None
        return net


def bn_of(source: nn.Module, graph: QGraph) -> dict[str, dict]:
    """Node name -> the raw conv weight and bias and the BatchNorm after it, for every conv export folds one into."""
    pairs = conv_bn_pairs(source)
    mods = dict(source.named_modules())
    out = {}
    for n in graph.weighted():
        bn = pairs.get(n.module or "")
        if bn is None or n.op != "conv":
            continue
        conv = mods[n.module]
        out[n.name] = {"w": conv.weight.float(), "eps": bn.eps,
                       "b": conv.bias.float() if conv.bias is not None else torch.zeros(conv.out_channels),
                       "gamma": bn.weight.float() if bn.affine else torch.ones(bn.num_features),
                       "beta": bn.bias.float() if bn.affine else torch.zeros(bn.num_features),
                       "mean": bn.running_mean.float(), "var": bn.running_var.float()}
    return out


def build_qat(source: nn.Module, calib: Iterable[torch.Tensor], qcfg: QuantConfig,
              bn_batch_statistics: bool = False) -> QATNet:
    """A QATNet starting at the PTQ reference of `source` (calibrated grids, round-to-nearest weight scales);
    bn_batch_statistics trains each conv's BatchNorm on batch statistics until the net is frozen (qat_bn.py)."""
    ref = quantize_nearest(source.eval(), calib, qcfg)
    net = QATNet(ref.graph, qcfg, ref.acts, {k: w.scale for k, w in ref.weights.items()}, ref.model_cfg,
                 getattr(source, "plateau_name", type(source).__name__),
                 bn_of(source, ref.graph) if bn_batch_statistics else None)
    net.source_state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    return net


def qat_gap(net: QATNet, cfg, test_set: ImageSet, mean: list[float], std: list[float], qat_top1: float) -> dict:
    """The end-of-run figures of a QAT run (the report's quantization gap): the FP model it started from, the
    training forward (float fake-quant, `qat_top1`) and the reference export writes (integer forward), on the
    test split; `ptq_top1` / `gap` hold the reference's, as for a flat-training run."""
    ref = net.cpu().to_reference()
    fp = evaluate(_Call(ref.float_forward), test_set, mean, std, 256, 0, 1, cfg.eval_limit)
    r = evaluate(_Call(ref), test_set, mean, std, 256, 0, 1, cfg.eval_limit)
    return {"bits": cfg.bits, "qat": True, "skipped": False, "fp_top1": fp["top1"], "fake_quant_top1": qat_top1,
            "reference_top1": r["top1"], "ptq_top1": r["top1"], "gap": fp["top1"] - r["top1"]}


class _Call(nn.Module):
    """A function evaluated like a model (evaluate() reads its device from a parameter: here none, the CPU)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

