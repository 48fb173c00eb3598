"""Session-wide tiny QDQ models for the compile tests (built once, a few seconds in all)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import compile_models as fx


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compile_models")


@pytest.fixture(scope="session")
def fp32_onnx(model_dir) -> Path:
    return fx.tiny_cnn_onnx(model_dir / "fp32.onnx")


@pytest.fixture(scope="session")
def qdq_models(model_dir, fp32_onnx) -> dict[str, Path]:
    """name -> QDQ ONNX: onnxruntime quantize_static (S8S8, U8S8, W4A8, W4A4, a MobileNet-like S8S8) and
    exporter-style opset 21 (int4, int8)."""
    return {
        "ort_s8s8": fx.ort_qdq(fp32_onnx, model_dir / "ort_s8s8.onnx", "s8", "s8"),
        "ort_u8s8": fx.ort_qdq(fp32_onnx, model_dir / "ort_u8s8.onnx", "u8", "s8"),
        # 4-bit weights from onnxruntime: com.microsoft Q/DQ nodes at opset 17.
        "ort_w4": fx.ort_qdq(fp32_onnx, model_dir / "ort_w4.onnx", "s8", "s4"),
        # 4-bit activations too: int8 in the library, clipped to -8..7 after each QuantizeLinear.
        "ort_w4a4": fx.ort_qdq(fp32_onnx, model_dir / "ort_w4a4.onnx", "s4", "s4"),
        # depthwise / stride 2 / ReLU6 / MaxPool
        "ort_mobile": fx.ort_qdq(fx.tiny_mobile_onnx(model_dir / "mobile_fp32.onnx"),
                                 model_dir / "ort_mobile.onnx"),
        "exporter_w4": fx.exporter_style_qdq(model_dir / "exporter_w4.onnx", w_bits=4),
        "exporter_w8": fx.exporter_style_qdq(model_dir / "exporter_w8.onnx", w_bits=8),
    }
