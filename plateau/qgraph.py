"""The captured graph (QGraph, a short list of QNodes) and the quantization parameters attached to it.

Graph capture (plateau.capture, from torch.fx) and the ONNX reader (plateau.export.onnx_reader) build it; the
fake-quant reference (plateau.reference) and the QDQ writer (plateau.export.onnx_writer) both walk it, so the
numbers the reference defines and the graph onnxruntime and TVM execute have the same structure by construction.

What an op kind means (how it is captured, computed, written) lives in its entry of the op table `OPS`
(plateau/ops/): a node only names its kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plateau.quant import QType, dequantize
from plateau.registry import Registry

__all__ = ["OPS", "QNode", "QGraph", "ActQ", "WeightQ", "reconstruction_units"]

# op kind -> its Op entry (plateau.ops.base.Op); filled by the modules of plateau/ops/.
OPS: Registry = Registry("op")


@dataclass
class QNode:
    name: str  # unique, ONNX-safe
    op: str  # a key of OPS
    inputs: list[str]
    module: str | None = None  # module path, for messages and per-layer settings
    attrs: dict = field(default_factory=dict)
    relu: bool = False
    weight: torch.Tensor | None = None  # folded float weight (conv/linear)
    bias: torch.Tensor | None = None

    @property
    def quantized_output(self) -> bool:
        return self.op == "input" or OPS.get(self.op).quantized_output

    @property
    def is_weighted(self) -> bool:
        return self.op != "input" and OPS.get(self.op).weighted


@dataclass
class QGraph:
    nodes: list[QNode]
    output: str
    input_shape: list[int]

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute what depends on the graph's structure (after a rewrite changed it)."""
        # A weighted node's int32 bias is quantized at its input's scale: record which quantization point that is.
        for n in self.weighted():
            n.attrs["_in_q"] = self.quant_source(n.inputs[0])

    def node(self, name: str) -> QNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def weighted(self) -> list[QNode]:
        return [n for n in self.nodes if n.is_weighted]

    def quant_source(self, name: str) -> str:
        """The node whose output quantization a tensor carries (follow pass-through ops upstream)."""
        n = self.node(name)
        while not n.quantized_output:
            n = self.node(n.inputs[0])
        return n.name


@dataclass
class ActQ:
    """An activation's quantization: x = (q - zero_point) * scale, q of type qtype."""

    scale: float  # a float32 value
    zero_point: int
    qtype: QType


@dataclass
class WeightQ:
    """A conv/linear layer's integer weight (per output channel, symmetric) and int32 bias."""

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


def reconstruction_units(graph: QGraph, per_block: bool) -> list[list[QNode]]:
    """The graph cut into units, in graph order: each conv/linear layer alone, or (per_block) the blocks between
    two points where one tensor carries everything later nodes read (a residual block, a transformer sublayer).
    Each unit has one input tensor and at least one conv/linear layer. Learned rounding reconstructs them one
    after the other; quantization-aware training distills and intervenes at their outputs."""
    if not per_block:
        return [[n] for n in graph.weighted()]
    # A cut after node k: no later node reads a tensor made before k (only k's own output crosses the cut).
    last_use = {n.name: k for k, n in enumerate(graph.nodes)}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = max(last_use[i], k)
    units, current, reach = [], [], 0  # reach: the last use of any tensor made before node k
    for k, n in enumerate(graph.nodes):
        reach = max(reach, last_use[graph.nodes[k - 1].name]) if k else 0
        if n.op == "input":
            continue
        current.append(n)
        if reach <= k and any(m.is_weighted for m in current):
            units.append(current)
            current = []
    if current and units:  # a tail without conv/linear (e.g. a final pooling) joins the last unit
        units[-1].extend(current)
    return units
