"""plateau.export -> plateau.compile: the compiled library reproduces the exporter's integer-exact fake-quant
reference bit for bit (the reference computes what the QDQ graph means with exact integer accumulation)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import tvm
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.compile.onnx_prep import output_step

export = pytest.importorskip("plateau.export")


@pytest.mark.parametrize("bits", ["W8A8", "W4A8", "W4A4"])
def test_compiled_matches_exporter_reference(tmp_path, bits):
    from plateau.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", width=8).eval()
    for mod in model.modules():  # non-trivial BN statistics, so folding matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    calib = [torch.tensor(x) for x in fx.calibration_batches(4, 8, hw=32)]  # small_cnn is 32x32
    ref = export.quantize_model(model, calib, export.QuantConfig.from_bits(bits))
    path = tmp_path / "model_qdq.onnx"
    onnx.save(export.to_qdq_onnx(ref), str(path))

    m = compile_onnx(path, "host", tmp_path / "host")
    assert m["ops"]["float_conv2d"] == 0 and m["ops"]["float_matmul"] == 0 and m["ops"]["int_conv2d"] == 5
    assert m["weight_bits"] == [int(bits[1])]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "host" / "model.so")), tvm.cpu())
    step = output_step(path)
    diffs = []
    for x in fx.calibration_batches(8, 8, seed=99, hw=32):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        with torch.no_grad():
            want = ref(torch.tensor(x)).numpy()
        diffs.append(np.rint(np.abs(ours.astype(np.float64) - want) / step).reshape(-1))
    d = np.concatenate(diffs)
    print(f"{bits} vs exporter reference: {json.dumps({'n': d.size, 'exact': float((d == 0).mean())})}")
    assert (d == 0).all(), f"{int((d != 0).sum())} of {d.size} logits differ (max {d.max()} steps)"
    stats = fx.compare_to_ort(path, tmp_path / "host" / "model.so", n_batches=8, hw=32)
    print(f"{bits} vs onnxruntime: {json.dumps(stats)}")
    assert stats["max_steps"] <= 1 and stats["top1"] == 1.0, stats
