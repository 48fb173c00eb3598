"""The helpers bench/compile_speed.py computes its figures with: MACs per image and the clock under load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compile_speed.py"


@pytest.fixture(scope="module")
def compile_speed():
    spec = importlib.util.spec_from_file_location("compile_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conv_macs_counts_convs_and_gemms(compile_speed, tmp_path):
    """Conv 3->8 (3x3, 8x8 output) = 8*8*8 outputs x 27 MACs; Linear 512->10 (a Gemm with transB) = 10 x 512. The
    batch dimension is dynamic in the file and counted as one image."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(512, 10))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(2, 3, 8, 8),), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}, "out": {0: "n"}}, dynamo=False)
    assert compile_speed.conv_macs(path) == 8 * 8 * 8 * 27 + 10 * 512


def test_measured_clock_is_a_clock(compile_speed):
    """The multiply chain is really executed: twice the iterations take twice the time (a folded loop would
    report a clock that doubles with them), and the result is a plausible core clock."""
    # The best of three each, and up to five rounds: a busy machine (benchmarks beside the tests, more processes
    # than cores) steals time from whole measurements; a folded loop would fail every round.
    for _ in range(5):
        a = max(compile_speed.measured_clock_ghz(20_000_000) for _ in range(3))
        b = max(compile_speed.measured_clock_ghz(40_000_000) for _ in range(3))
        if abs(a - b) / max(a, b) < 0.25:
            break
    assert 0.5 < a < 7.0 and 0.5 < b < 7.0
    assert abs(a - b) / max(a, b) < 0.25, (a, b)
