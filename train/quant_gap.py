"""The quantization gap: FP top-1 against PTQ top-1 at the run's bits, measured once training ends.

Its one contact with a later stage is the single import of the export stage's quantizer below (where the
reference quantizer lives today); it is measured, never re-implemented, here.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from plateau.data import ImageSet

from .evaluate import evaluate, fixed_batches

__all__ = ["measure_quant_gap"]


def measure_quant_gap(model: nn.Module, cfg: Any, train_set: ImageSet, test_set: ImageSet, mean: list[float],
                      std: list[float], fp_top1: float) -> dict:
    """{'bits', 'fp_top1', 'skipped', ...} for the TrainConfig `cfg`: PTQ calibrated on fixed train images,
    evaluated like the FP model. A missing or failing export stage is reported (skipped, reason), not
    raised."""
    if not cfg.quant_gap:
        reason = "switched off (quant_gap=False)"
        return {"bits": cfg.bits, "fp_top1": fp_top1, "skipped": True, "reason": reason}
    out = {"bits": cfg.bits, "fp_top1": fp_top1, "calib_images": cfg.calib_images, "calib_split": "train"}
    try:
        from plateau.export import QuantConfig, quantize_model
    except ImportError as e:  # the export stage may be missing: say so, do not fail the training run
        return {**out, "skipped": True, "reason": f"plateau.export.quantize_model unavailable ({e})"}
    try:
        calib = [x for x, _ in fixed_batches(train_set, cfg.calib_images, mean, std)]
        extra = {"keep_first_last_8bit": True} if cfg.keep_first_last_8bit else {}
        qmodel = quantize_model(copy.deepcopy(model).eval(), calib, QuantConfig.from_bits(cfg.bits, **extra))
        q = evaluate(qmodel, test_set, mean, std, 256, 0, 1, cfg.eval_limit)
    except Exception as e:  # another stage's failure is reported, not raised: the trained model is good
        return {**out, "skipped": True, "reason": f"quantize_model failed: {type(e).__name__}: {e}"}
    return {**out, "skipped": False, "ptq_top1": q["top1"], "gap": fp_top1 - q["top1"]}
