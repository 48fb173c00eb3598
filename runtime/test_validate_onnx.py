"""`plateau validate --onnx FILE`: a transformer QDQ file from onnxruntime's own quantizer (no Plateau export),
compiled and checked against onnxruntime on the same file, logits counted in accumulator steps of the last layer."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch

from plateau.export.validate import ort_u8s8_saturates
from plateau.models import create_model
from plateau.ort_quantizer import ort_quantize
from plateau.runtime.validate_onnx import output_step


def _plateau(cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plateau", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def vit_qdq(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, depth=2, embed_dim=32, num_heads=2,
                         mlp_ratio=2.0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, 16, 16), str(d / "fp32.onnx"), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False)
    calib = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    ort_quantize(d / "fp32.onnx", calib, d / "qdq.onnx", "qdq", "s8")
    return d


def test_output_step_of_quantize_static_file(vit_qdq):
    model = onnx.load(str(vit_qdq / "qdq.onnx"))
    step, what = output_step(model)  # quantize_static quantizes the logits: its DequantizeLinear's scale
    assert "DequantizeLinear" in what and float(step) > 0
    # without that QuantizeLinear/DequantizeLinear pair the last MatMul/Gemm's accumulator unit, per channel
    g = model.graph
    made_by = {o: n for n in g.node for o in n.output}
    dq = made_by[g.output[0].name]
    q = made_by[dq.input[0]]
    for n in g.node:
        n.output[:] = [g.output[0].name if o == q.input[0] else o for o in n.output]
    g.node.remove(dq)
    g.node.remove(q)
    step, what = output_step(model)
    assert "accumulator" in what and np.all(np.asarray(step) > 0) and np.asarray(step).size in (1, 10)


@pytest.mark.slow
def test_validate_third_party_vit_qdq(vit_qdq):
    d = vit_qdq
    p = _plateau(d, "compile", "--onnx", "qdq.onnx", "--run", "r", "--allow-float")
    assert p.returncode == 0, p.stderr[-2000:]
    p = _plateau(d, "validate", "--onnx", "qdq.onnx", "--run", "r", "--data", "synthetic", "--limit", "64",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((d / "r/validate/host/report.json").read_text())
    c = r["device_vs_onnxruntime"]
    assert r["test_images"] == 64 and c["values"] == 640 and c["top1_agreement"] >= 0.95
    assert c["within_one_step"] >= 0.9 and "DequantizeLinear" in r["output_step_source"]
    assert len(r["float_islands"]) >= 6 and r["onnxruntime_kernels"]  # Split, Div, Erf per block
    p = _plateau(d, "bench", "--onnx", "qdq.onnx", "--run", "r", "--data", "synthetic", "--fp32", "fp32.onnx",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--eval-limit", "64", "--batch", "8",
                 "--max-seconds", "0.5", "--calib-images", "32", "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    b = json.loads((d / "r/bench/host/report.json").read_text())
    engines = {e["engine"]: e for e in b["engines"]}
    assert {"TVM (compiled from the file)", "ORT int8 on the file", "ORT fp32"} <= set(engines)
    assert any(k.startswith("ORT int8 QOP") for k in engines)
    tvm, ort = engines["TVM (compiled from the file)"], engines["ORT int8 on the file"]
    assert tvm["top1"] == r["top1"]["device"] and tvm["latency"]["batch_8"]["median_ms"] > 0  # same library, images
    # bench times onnxruntime as a user runs it (a default session: on x86 the file's int8 QDQ becomes U8S8), whose
    # int8 kernels are exact where U8S8 is: not on x86 without VNNI (int16 pair sums saturate at 8-bit weights)
    if not ort_u8s8_saturates():
        assert ort["top1"] == tvm["top1"]
    assert (b["onnxruntime_int8_note"] is not None) == ort_u8s8_saturates()  # and the report says which
    # another file than the one compiled: refused in one line
    other = d / "other.onnx"
    other.write_bytes((d / "fp32.onnx").read_bytes())
    p = _plateau(d, "validate", "--onnx", "other.onnx", "--run", "r", "--data", "synthetic")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "plateau compile --onnx" in p.stderr


def test_validate_onnx_needs_data(vit_qdq):
    p = _plateau(vit_qdq, "validate", "--onnx", "qdq.onnx", "--run", "none")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--data" in p.stderr, p.stderr
