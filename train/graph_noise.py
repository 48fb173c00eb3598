"""Quantization noise inside attention: a model whose matmuls multiply two activations (a transformer's Q.K^T and
P.V) is trained through a torch.fx copy of its forward, unfused, with AQE on each of those inputs.

The Conv/Linear hooks of NoiseInjector cover every layer input (a LayerNorm's output, GELU's, the head's). What no
layer reads are the attention matmuls' operands: the query, the (transposed) key, the probabilities and the value.
Each gets the Gaussian rounding noise of its own quantization point (act bits; the probabilities at
`probability_bits`), its range tracked like every other. The copy shares the model's modules and parameters, so the
optimizer, the checkpoints and the weight noise see the model itself.

    >>> net = attention_noise_graph(model, injector)     # None for a model without such matmuls (a CNN)
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from plateau.capture import unfused_attention

from .noise import NoiseInjector

__all__ = ["attention_noise_graph", "NoisePoint"]

_MATMULS = (operator.matmul, torch.matmul, torch.bmm)


class NoisePoint(nn.Module):
    """The AQE of one activation (a module, so torch.fx calls it like any layer)."""

    def __init__(self, injector: NoiseInjector, name: str, bits: int, fixed_range: bool = False) -> None:
        super().__init__()
        self.injector, self.key, self.bits, self.fixed_range = injector, name, bits, fixed_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.injector.perturb(self.key, x, self.bits, self.training, range_grad=not self.fixed_range)


def _is_softmax(n: object, gm: fx.GraphModule) -> bool:
    """Whether `n` is a softmax's output (through dropout / identity layers, as attention's probabilities are)."""
    while isinstance(n, fx.Node) and n.op == "call_module" and isinstance(
            gm.get_submodule(n.target), (nn.Dropout, nn.Identity)):
        n = n.args[0]
    if not isinstance(n, fx.Node) or n.op == "call_module":
        return False
    if n.op == "call_method":
        return n.target == "softmax"
    return getattr(n.target, "__name__", "") == "softmax"


def attention_noise_graph(model: nn.Module, injector: NoiseInjector, probability_bits: int = 8
                          ) -> fx.GraphModule | None:
    """The model's forward as a GraphModule with a NoisePoint on each operand of every activation x activation
    matmul, or None when there is none (or the model cannot be traced: the hooks then cover what they can)."""
    try:
        with unfused_attention(model):
            gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model trains with the layer hooks alone
        return None
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _MATMULS
               and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in n.args[:2])]
    if not matmuls:
        return None
    bits = injector.cfg.a_bits
    for k, mm in enumerate(matmuls):
        for i in range(2):
            src = mm.args[i]
            name = f"attention{k}.{'ab'[i]}"
            probs = _is_softmax(src, gm)  # export gives them a fixed grid (2^-8): no range to pay for
            point = NoisePoint(injector, name, probability_bits if probs else bits, fixed_range=probs)
            gm.add_submodule(f"plateau_noise_{k}_{i}", point)
            with gm.graph.inserting_before(mm):
                noisy = gm.graph.call_module(f"plateau_noise_{k}_{i}", (src,))
            mm.replace_input_with(src, noisy)
    gm.recompile()
    return gm
