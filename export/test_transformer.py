"""Transformers through export: a tiny timm ViT (2 blocks, width 32) is captured with every Linear, both attention
matmuls and the patch embedding in integers, LayerNorm / Softmax / GELU as float islands, and onnxruntime runs the
QDQ file in integer kernels and agrees with the reference."""

import numpy as np
import onnx
import pytest
import torch

from plateau.calibrate import probability_points
from plateau.export import QuantConfig, capture, quantize_model, to_qdq_onnx
from plateau.export.validate import (
    compare_logits,
    ort_kernels,
    ort_quant_points,
    ort_u8s8_pairs_fit,
    ort_u8s8_saturates,
)
from plateau.models import create_model
from plateau.reference import run_graph

torch.set_num_threads(2)


def _tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=16, depth=2, embed_dim=32, num_heads=2, mlp_ratio=2.0, **kw)
    return create_model("vit_tiny_patch16_224", num_classes=10, **args).eval()


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False}], ids=["cls", "avgpool"])
def test_tiny_vit_is_captured_in_integer_ops(kw):
    model = _tiny_vit(**kw)
    g = capture(model, [1, 3, 16, 16])
    ops = [n.op for n in g.nodes]
    # patch embedding + 2 x (q, k, v, proj, fc1, fc2) + head; Q.K^T and P.V per block
    assert ops.count("conv") == 1 and ops.count("linear") == 13 and ops.count("matmul") == 4
    kinds = sorted(n.attrs["kind"] for n in g.nodes if n.op == "float")
    assert kinds == ["gelu"] * 2 + ["layer_norm"] * 5 + ["softmax"] * 2  # 2 per block, then the final norm
    assert not any(n.op in ("cat", "mul") for n in g.nodes)  # class token and attention scale folded away
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g, x), model(x), atol=1e-5, rtol=1e-4)


def test_tiny_vit_matches_onnxruntime(tmp_path):
    """The default export: GELU a table, Softmax and LayerNorm in their exact forms; onnxruntime runs every
    Linear and both attention matmuls in integer kernels and computes every quantization point exactly as the
    reference does."""
    model = _tiny_vit()
    calib = [torch.randn(32, 3, 16, 16) * 0.5]
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    for p in probability_points(ref.graph):  # attention probabilities: the fixed unsigned 2^-8 grid
        assert ref.acts[p].qtype.signed is False and ref.acts[p].zero_point == 0 and ref.acts[p].scale == 2**-8
    assert sorted({n.op for n in ref.graph.nodes} & {"lut", "exact_softmax", "exact_layernorm", "float"}) == [
        "exact_layernorm", "exact_softmax", "lut"]
    qdq = to_qdq_onnx(ref)
    onnx.save(qdq, tmp_path / "vit.onnx")
    k = ort_kernels(tmp_path / "vit.onnx")
    # every Linear a QGemm, the patch embedding a QLinearConv, Q.K^T a QLinearMatMul; P.V (uint8 probabilities
    # times int8 values) runs as a float MatMul of the dequantized integers in onnxruntime: exact all the same
    assert k["ops"].get("QGemm") == 13 and k["ops"].get("QLinearConv") == 1 and k["ops"].get("QLinearMatMul") == 2
    x = torch.randn(64, 3, 16, 16) * 0.5
    keys = [n for n in ref.acts if ref.graph.node(n).op != "const"]
    got = ort_quant_points(qdq, keys)(x.numpy())
    mid = ref.intermediates(x)
    for key in keys:
        np.testing.assert_array_equal(got[f"{key}.q"].astype(np.int64), mid[key].numpy().astype(np.int64),
                                      err_msg=key)
    floats = quantize_model(model, calib, QuantConfig.from_bits("W8A8", exact_islands=False))
    assert {n.attrs["kind"] for n in floats.graph.nodes if n.op == "float"} == {"gelu", "softmax", "layer_norm"}
    c = compare_logits(ref(x).numpy(), floats(x).numpy(), floats.output_step)  # the float32 islands
    assert c["top1_agreement"] >= 0.98 and c["within_one_step"] >= 0.95, c


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_vit_file_loads_in_a_default_onnxruntime_session(tmp_path, bits):
    """What a user does first: onnxruntime.InferenceSession(path) with no options (on x86 that is without
    `session.qdqisint8allowed`, so onnxruntime rewrites int8 QDQ pairs to uint8). The token-row Reshapes before the
    Gemms act on the integers, so onnxruntime's own QDQ moves cannot make the QuantizeLinear its type check rejects
    (it did, on every ViT file); the logits are the reference's, where onnxruntime's U8S8 kernels are exact: on x86
    without VNNI they add product pairs in int16, which 8-bit weights overflow (4-bit ones do not)."""
    import onnxruntime as ort

    model = _tiny_vit()
    ref = quantize_model(model, [torch.randn(32, 3, 16, 16) * 0.5], QuantConfig.from_bits(bits))
    onnx.save(to_qdq_onnx(ref), tmp_path / "vit.onnx")
    sess = ort.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(16, 3, 16, 16) * 0.5
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (16, 10) and np.isfinite(got).all()
    max_weight = max(int(w.q.abs().max()) for w in ref.weights.values())
    if not ort_u8s8_saturates() or ort_u8s8_pairs_fit(max_weight):
        c = compare_logits(got, ref(x).numpy(), ref.output_step)
        assert c["top1_agreement"] == 1.0 and c["max_steps"] <= 2, c


def test_integer_only_vit_is_exact_on_onnxruntime(tmp_path):
    """--integer-only: LayerNorm, Softmax and GELU in integer ops; onnxruntime computes every quantization point
    exactly as the reference does (no float op left), and the accuracy stays that of the float islands."""
    model = _tiny_vit()
    calib = [torch.randn(32, 3, 16, 16) * 0.5]
    ref = quantize_model(model, calib, QuantConfig.from_bits("W8A8", integer_only=True))
    assert not any(n.op == "float" for n in ref.graph.nodes)
    assert sorted({n.op for n in ref.graph.nodes} & {"lut", "int_softmax", "int_layernorm"}) == [
        "int_layernorm", "int_softmax", "lut"]
    qdq = to_qdq_onnx(ref)
    x = torch.randn(64, 3, 16, 16) * 0.5
    keys = [n for n in ref.acts if ref.graph.node(n).op != "const"]
    got = ort_quant_points(qdq, keys)(x.numpy())
    mid = ref.intermediates(x)
    for k in keys:
        np.testing.assert_array_equal(got[f"{k}.q"].astype(np.int64), mid[k].numpy().astype(np.int64), err_msg=k)
    floats = quantize_model(model, calib, QuantConfig.from_bits("W8A8"))
    c = compare_logits(ref(x).numpy(), floats(x).numpy(), floats.output_step)
    assert c["top1_agreement"] >= 0.95, c
