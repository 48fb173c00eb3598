"""Post-training quantization: capture -> calibrate -> round weights (to nearest, or a learned method) -> the
fake-quant reference (plateau.reference.FakeQuantModel).

    >>> ref = quantize_model(model, [x_calib], QuantConfig.from_bits("W8A8"))
    >>> logits = ref(x)

Rounding methods are entries of plateau.qconfig.ROUNDINGS: "nearest" (the calibrated round-to-nearest weights)
and those this package registers ("adaround": learned rounding per layer or block, adaround.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from plateau.calibrate import calibrate, quantize_weights
from plateau.capture import capture
from plateau.models import model_cfg
from plateau.ops.island_forms import integer_forms
from plateau.qconfig import ROUNDINGS, QuantConfig
from plateau.qgraph import QGraph
from plateau.reference import FakeQuantModel

from . import adaround  # noqa: F401  (registers the learned rounding methods)

__all__ = ["quantize_graph", "quantize_model"]


def quantize_graph(graph: QGraph, calib: Iterable[torch.Tensor], cfg: QuantConfig, progress: bool = False,
                   model_cfg: dict | None = None) -> FakeQuantModel:
    """quantize_model for a graph that did not come from torch (e.g. read from an FP32 ONNX file)."""
    batches = [x for x in calib]
    integer_forms(graph, cfg)
    acts = calibrate(graph, batches, cfg)
    weights = quantize_weights(graph, acts, cfg)
    weights, acts = ROUNDINGS.get(cfg.rounding)(graph, acts, weights, batches, cfg, progress=progress)
    return FakeQuantModel(graph, acts, weights, cfg, model_cfg)


def quantize_model(model: nn.Module, calib: Iterable[torch.Tensor], cfg: QuantConfig,
                   input_shape: list[int] | None = None, progress: bool = False) -> FakeQuantModel:
    """Fold BN, calibrate activations, quantize weights (rounding to nearest or learned) -> the reference model."""
    mcfg = model_cfg(model)
    shape = input_shape or [1, *mcfg["input_size"]]
    return quantize_graph(capture(model, shape, cfg.allow_float), calib, cfg, progress, mcfg)
