"""What `plateau export` does when the user names no method: the best choice the benchmarks measured
(bench/RESULTS.md, "Export: post-training quantization"), by bit width; `--fast` for a quick export instead.

    8-bit weights and activations   round to nearest, min-max ranges: nothing left to gain (ResNet-20 81.16%
                                    against FP 81.03%; ViT-Tiny within 0.2 points)
    weights below 8 bits            learned rounding per block (BRECQ with QDrop), MSE weight scales, 1024
                                    calibration images; with 8-bit activations also learned activation clipping
                                    (ResNet-20 W4A8: 81.16% against 77.50% rounding to nearest)
    activations below 8 bits        as above with MSE activation ranges and no learned clipping (ResNet-20 W4A4,
                                    first/last 8-bit: 79.91%; ViT-Tiny W4A4 within ~0.5 points)
    --fast                          round to nearest; MSE ranges below 8 bits (seconds instead of minutes)

Anything the user gives explicitly wins over these.
"""

from __future__ import annotations

__all__ = ["PRESET_FIELDS", "ptq_defaults"]

PRESET_FIELDS = ("rounding", "reconstruction", "learn_act_clip", "act_calibration", "weight_calibration",
                 "calib_images")


def ptq_defaults(weight_bits: int, act_bits: int, fast: bool = False) -> dict:
    """The values of PRESET_FIELDS for a configuration the user left them open in."""
    low_w, low_a = weight_bits < 8, act_bits < 8
    out = {"rounding": "nearest", "reconstruction": "layer", "learn_act_clip": False,
           "act_calibration": "mse" if low_a else "minmax", "weight_calibration": "mse" if low_w or low_a else "minmax",
           "calib_images": 512}
    if fast or not (low_w or low_a):
        if not (low_w or low_a):
            out.update(act_calibration="minmax", weight_calibration="minmax")
        return out
    out.update(rounding="adaround", reconstruction="block", learn_act_clip=not low_a, calib_images=1024)
    return out
