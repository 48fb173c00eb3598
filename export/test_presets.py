"""The methods `plateau export` picks when the user names none: the best measured per bit width, --fast for
speed, anything given explicitly wins."""

import argparse

from plateau.export import stage
from plateau.export.presets import ptq_defaults


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    stage.add_arguments(p)
    return p.parse_args(list(argv))


def test_presets_by_bit_width():
    assert ptq_defaults(8, 8)["rounding"] == "nearest" and ptq_defaults(8, 8)["act_calibration"] == "minmax"
    w4a8 = ptq_defaults(4, 8)
    assert (w4a8["rounding"], w4a8["reconstruction"], w4a8["learn_act_clip"]) == ("adaround", "block", True)
    assert w4a8["weight_calibration"] == "mse" and w4a8["act_calibration"] == "minmax"
    w4a4 = ptq_defaults(4, 4)
    assert w4a4["learn_act_clip"] is False and w4a4["act_calibration"] == "mse" and w4a4["calib_images"] == 1024
    fast = ptq_defaults(4, 4, fast=True)
    assert fast["rounding"] == "nearest" and fast["act_calibration"] == "mse"


def test_cli_leaves_preset_fields_open_and_explicit_values_win():
    a = _parse("--bits", "W4A8")
    assert all(getattr(a, k) is None for k in ("rounding", "reconstruction", "learn_act_clip", "calib_images"))
    b = _parse("--bits", "W4A8", "--rounding", "nearest", "--no-learn-act-clip", "--calib-images", "64")
    assert (b.rounding, b.learn_act_clip, b.calib_images) == ("nearest", False, 64)
