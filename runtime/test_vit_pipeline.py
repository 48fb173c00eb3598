"""A tiny timm ViT through the real CLI, stage by stage: train (image size and model keyword arguments recorded)
-> export (rebuilt from the manifest; onnxruntime bit-exact with the reference) -> compile (every matmul an integer
kernel, no float island) -> validate (bit-exact, per layer). A data set whose image size the model was not built
for is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "16",
        "--model-kwargs", "depth=2,embed_dim=32,num_heads=2,mlp_ratio=2.0"]


def _plateau(cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plateau", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_tiny_vit_train_export_compile_validate(tmp_path):
    p = _plateau(tmp_path, "train", "--run", "r", *TINY, "--data", "synthetic", "--epochs", "1", "--train-limit",
                 "256", "--batch-size", "64", "--flatness", "off", "--eval-limit", "64", "--bn-recalibrate", "0",
                 "--no-quant-gap", "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    p = _plateau(tmp_path, "export", "--run", "r", "--eval-limit", "64", "--calib-images", "64")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "r/export/report.json").read_text())
    assert rep["float_islands"] == [] and rep["onnxruntime_vs_reference"]["bit_exact"] == 1.0
    assert sorted({i["form"] for i in rep["integer_islands"]}) == ["exact_layernorm", "exact_softmax", "lut"]
    p = _plateau(tmp_path, "compile", "--run", "r")
    assert p.returncode == 0, p.stderr[-2000:]
    man = json.loads((tmp_path / "r/compile/host/manifest.json").read_text())
    assert man["ops"]["int_matmul"] == 17 and man["ops"]["float_matmul"] == 0 and man["float_islands"] == []
    p = _plateau(tmp_path, "validate", "--run", "r", "--limit", "64", "--per-layer")
    assert p.returncode == 0, p.stderr[-2000:]
    val = json.loads((tmp_path / "r/validate/host/report.json").read_text())
    assert val["device_vs_reference"]["bit_exact"] == 1.0 and val["top1"]["device"] == val["top1"]["reference"]


def test_image_size_the_model_was_not_built_for(tmp_path):
    d = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (d / split / c).mkdir(parents=True)
            from PIL import Image

            Image.new("RGB", (24, 24), (10, 200, 30)).save(d / split / c / "x.png")
    p = _plateau(tmp_path, "train", "--run", "r", "--model", "vit_tiny_patch16_224", "--model-kwargs",
                 "depth=1,embed_dim=32,num_heads=2,patch_size=8", "--data", str(d), "--epochs", "1", "--no-progress")
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "24x24" in p.stderr and "224x224" in p.stderr and "--img-size" in p.stderr
    assert not (tmp_path / "r" / "train" / "last.pt").exists()
