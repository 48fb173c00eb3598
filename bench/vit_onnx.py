"""A ViT-Tiny for CIFAR-sized inputs as ONNX: FP32 and onnxruntime's quantize_static QDQ (S8S8), for
bench/compile_speed.py's transformer run. timm `vit_tiny_patch16_224` at 32x32 with 4x4 patches (65 tokens, 12
layers, 3 heads of 64), 10 classes, random weights (seed 0): speed does not depend on them. Plateau's own exporter
does not take timm's ViT graph (its Shape/Gather ops), so onnxruntime quantizes it.

    .venv/bin/python bench/vit_onnx.py runs/vit      # writes runs/vit/vit_fp32.onnx and runs/vit/vit_qdq.onnx
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from plateau.models import create_model
from plateau.ort_quantizer import ort_quantize


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4).eval()
    fp32 = out / "vit_fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(fp32), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    calib = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    ort_quantize(fp32, calib, out / "vit_qdq.onnx", "qdq", "s8", "s8", batch=16)
    print(f"wrote {fp32} and {out / 'vit_qdq.onnx'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vit"))
