"""The quantization gap: FP top-1 against PTQ top-1 at the run's bits, measured once training ends.

PTQ here is the core's round-to-nearest quantizer (plateau.calibrate.quantize_nearest): the reference numerics
`plateau export` starts from, before its learned rounding.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from plateau.calibrate import quantize_nearest
from plateau.data import ImageSet
from plateau.qconfig import QuantConfig

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
        calib = [x for x, _ in fixed_batches(train_set, cfg.calib_images, mean, std)]
        qcfg = QuantConfig.from_bits(cfg.bits, keep_first_last_8bit=cfg.keep_first_last_8bit, allow_float=True)
        qmodel = quantize_nearest(copy.deepcopy(model).cpu().eval(), calib, qcfg)
        q = evaluate(qmodel, test_set, mean, std, 256, 0, 1, cfg.eval_limit)
    except Exception as e:  # a model PTQ cannot take is reported, not raised: the trained model is good
        return {**out, "skipped": True, "reason": f"quantize_nearest failed: {type(e).__name__}: {e}"}
    return {**out, "skipped": False, "ptq_top1": q["top1"], "gap": fp_top1 - q["top1"]}
