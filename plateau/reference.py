"""The fake-quant reference: what a quantized graph computes, defined once. onnxruntime and every TVM target are
held to it.

Two interpreters walk a QGraph with the op table (plateau/ops/):

    run_graph      float execution: the float model (no parameters), calibration (observe=), or float
                   fake-quant (fake_quantize at every quantization point, dequantized weights): differentiable,
                   what learned rounding and quantization-aware training optimize
    run_graph_int  the reference numerics: integers carried between nodes (float64 tensors holding exact
                   integers); conv/linear accumulate exactly and requantize with the float32 multiplier
                   float32(float32(s_x * s_w) / s_y), as integer kernels do; averages likewise; add, mul, concat
                   and float islands follow ONNX's float semantics (dequantize in float32, the op, quantize)

Conventions: input and every compute op's output are quantized per tensor (asymmetric); weights per output channel,
symmetric, narrow range (-127..127 at 8 bits); the int32 bias at scale float32(s_x * s_w) (quant.quantize_bias).
The logits (graph output) are always quantized at 8 bits, so argmax is not decided by ties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from plateau.ops import OPS
from plateau.ops.base import q as quantize_act
from plateau.ops.base import relu_clip
from plateau.qgraph import ActQ, QGraph, QNode, WeightQ
from plateau.quant import fake_quantize

__all__ = ["run_nodes", "run_graph", "run_graph_int", "FakeQuantModel"]

Observer = Callable[[str, torch.Tensor], None]


def run_nodes(nodes: list[QNode], env: dict[str, torch.Tensor], acts: dict[str, ActQ] | None = None,
              weights: dict[str, WeightQ] | None = None, observe: Observer | None = None,
              free: dict[str, int] | None = None) -> None:
    """Execute `nodes` in order, reading their inputs from and writing their outputs to `env` (an input node's
    value must be there already). Float when acts/weights are None, fake-quant otherwise; observe(name, tensor)
    sees every quantization point's float value. `free` (node -> index in `nodes` of its last reader) drops each
    value from env once read for the last time."""
    for k, n in enumerate(nodes):
        if n.op == "input":
            y = env[n.name]
        else:
            w = b = None
            if n.is_weighted:
                if weights is not None and n.name in weights:
                    w, b = weights[n.name].weight(), weights[n.name].bias()
                else:
                    w, b = n.weight, n.bias
            y = relu_clip(n, OPS.get(n.op).run_float(n, [env[i] for i in n.inputs], w, b))
        if n.quantized_output:
            if observe is not None:
                observe(n.name, y)
            if acts is not None and n.name in acts:
                a = acts[n.name]
                y = fake_quantize(y, a.scale, a.zero_point, a.qtype)
        env[n.name] = y
        if free is not None:
            for i in n.inputs:
                if free.get(i, -1) <= k:
                    env.pop(i, None)


def run_graph(
    graph: QGraph,
    x: torch.Tensor,
    acts: dict[str, ActQ] | None = None,
    weights: dict[str, WeightQ] | None = None,
    observe: Observer | None = None,
    keep: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Execute the graph: float when acts/weights are None, fake-quant otherwise.

    observe(name, tensor) sees every quantization point's float value; keep=True returns all node outputs.
    """
    vals: dict[str, torch.Tensor] = {graph.nodes[0].name: x}
    run_nodes(graph.nodes, vals, acts, weights, observe)
    return vals if keep else vals[graph.output]


@torch.no_grad()
def run_graph_int(graph: QGraph, x: torch.Tensor, acts: dict[str, ActQ], weights: dict[str, WeightQ],
                  keep: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """The reference numerics (module doc): integers carried from node to node, each op's `run_int`.
    Returns dequantized logits, or with keep=True the integer outputs of every quantization point."""
    qv: dict[str, torch.Tensor] = {}  # node -> integer tensor (float64)
    qa: dict[str, ActQ] = {}  # node -> the quantization it carries
    for n in graph.nodes:
        if n.op == "input":
            a = acts[n.name]
            qv[n.name], qa[n.name] = quantize_act(x, a).double(), a
            continue
        ain = [qa[i] for i in n.inputs]
        a = acts.get(n.name, ain[0] if ain else None)
        y = OPS.get(n.op).run_int(n, [qv[i] for i in n.inputs], ain, a, weights.get(n.name))
        qv[n.name], qa[n.name] = y.double(), a
    if keep:
        return {k: v for k, v in qv.items() if k in acts}
    out = qa[graph.output]
    return (qv[graph.output] - out.zero_point).to(torch.float32) * np.float32(out.scale)


class FakeQuantModel(nn.Module):
    """The fake-quant reference: a graph plus its quantization parameters, callable like the original model.

    `cfg` is the QuantConfig that made it; `model_cfg` the model's input size and normalization."""

    def __init__(self, graph: QGraph, acts: dict[str, ActQ], weights: dict[str, WeightQ], cfg,
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

    def to_device(self, device: torch.device | str) -> FakeQuantModel:
        """Move every tensor of the graph and the parameters to `device` (a GPU runs the same numbers: integers
        are exact in float64 there too); returns self."""
        def move(v: object) -> object:
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: move(u) for k, u in v.items()}
            return v

        for n in self.graph.nodes:
            n.weight, n.bias, n.attrs = move(n.weight), move(n.bias), move(n.attrs)
        for w in self.weights.values():
            w.q, w.scale, w.bias_q, w.bias_scale = (move(t) for t in (w.q, w.scale, w.bias_q, w.bias_scale))
        return self

    @property
    def output_step(self) -> float:
        return self.acts[self.graph.quant_source(self.graph.output)].scale
