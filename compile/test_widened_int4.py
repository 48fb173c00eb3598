"""The exporter's widened 4-bit layout (INT4 weight -> Cast(INT8) -> DequantizeLinear; activations clamped in
INT8) compiles to the same 4-bit kernels as the native one: onnx_prep reads through the Cast, the weights stay
packed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.compile.onnx_prep import prepare_onnx
from plateau.quant import pack_int4


def _cast_conv(path, to: int) -> None:
    """input -> Q/DQ -> Conv(DQ(Cast(W int4, to))) -> Q/DQ."""
    w = np.random.default_rng(3).integers(-7, 8, (4, 3, 3, 3))
    inits = [helper.make_tensor("w4", TensorProto.INT4, list(w.shape), pack_int4(w).tobytes(), raw=True)]
    inits += [numpy_helper.from_array(a, n) for n, a in (
        ("xs", np.float32(0.02)), ("xz", np.int8(3)), ("ws", np.full(4, 0.01, np.float32)),
        ("ys", np.float32(0.05)), ("yz", np.int8(-5)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
             helper.make_node("Cast", ["w4"], ["w8"], to=to),
             helper.make_node("DequantizeLinear", ["w8", "ws"], ["wf"], axis=0),
             helper.make_node("Conv", ["x", "wf"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 3, 8, 8], "cast_conv")


@pytest.mark.parametrize("to, kept", [(TensorProto.INT8, False), (TensorProto.UINT8, True)])
def test_widening_cast_is_read_through(tmp_path, to, kept):
    """Cast(INT4 -> INT8) is the same integers: dropped, the weight stays 4-bit. Cast(INT4 -> UINT8) changes
    the negative values: left alone (folded as a constant into an 8-bit weight)."""
    _cast_conv(tmp_path / "m.onnx", to)
    prep = prepare_onnx(tmp_path / "m.onnx")
    assert not any(n.op_type == "Cast" for n in prep.model.graph.node)  # dropped, or folded into a constant
    assert prep.compute_weight_bits == ({8} if kept else {4})
    assert prep.weight_bits.get("w4") == 4


@pytest.mark.parametrize("bits", ["W4A8", "W4A4"])
def test_widened_and_native_layouts_compile_alike(tmp_path, bits):
    """Both layouts of one reference give libraries with packed 4-bit weights and identical logits."""
    from plateau.export import QuantConfig, quantize_model, to_qdq_onnx
    from plateau.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", width=8).eval()
    calib = [torch.tensor(x) for x in fx.calibration_batches(2, 8, hw=32)]
    ref = quantize_model(model, calib, QuantConfig.from_bits(bits))
    x = fx.calibration_batches(1, 16, seed=5, hw=32)[0]
    outs = {}
    for layout in ("widened", "native"):
        path = tmp_path / f"{layout}.onnx"
        onnx.save(to_qdq_onnx(ref, four_bit=layout), str(path))
        m = compile_onnx(path, "host", tmp_path / layout)
        assert m["weight_bits"] == [4] and m["packed_int4_weights"] == 6, m
        assert m["ops"]["float_conv2d"] == 0 and m["ops"]["float_matmul"] == 0
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / layout / "model.so")), tvm.cpu())
        outs[layout] = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(outs["widened"], outs["native"])
    with torch.no_grad():
        np.testing.assert_array_equal(outs["widened"], ref(torch.tensor(x)).numpy())
