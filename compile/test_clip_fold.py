"""onnx_prep folds Clip -> QuantizeLinear (ReLU6) into QuantizeLinear -> a clamp on the integers, so the conv
before it still lowers to an integer kernel."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper
from support import compile_models as fx

from plateau.compile import compile_onnx
from plateau.compile.onnx_prep import output_step


def _relu6_conv_qdq(path, out_scale: float) -> None:
    """input -> Q/DQ -> Conv -> Clip(0, 6) -> Q(out_scale, -128) -> DQ: the ReLU6 of a MobileNet block."""
    rng = np.random.default_rng(4)
    w = rng.integers(-60, 60, (8, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("xs", np.float32(0.03)), ("xz", np.int8(0)), ("w", w), ("ws", np.float32(0.02)),
        ("lo", np.float32(0.0)), ("hi", np.float32(6.0)), ("ys", np.float32(out_scale)),
        ("yz", np.int8(-128)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"]),
             helper.make_node("Conv", ["x", "wf"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["y", "lo", "hi"], ["y6"], name="relu6"),
             helper.make_node("QuantizeLinear", ["y6", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 3, 8, 8], "relu6")


@pytest.mark.parametrize("out_scale", [0.05, 0.02])  # range 12.75 (the clip at 6 bites) / 5.1 (it never does)
def test_relu6_folds_into_the_integer_conv(tmp_path, out_scale):
    """Clip -> QuantizeLinear becomes QuantizeLinear -> a clamp on the integers: the conv lowers to integers,
    no float island, and the library equals onnxruntime."""
    from plateau.compile.onnx_prep import prepare_onnx
    from plateau.export.validate import ort_session

    _relu6_conv_qdq(tmp_path / "m.onnx", out_scale)
    prep = prepare_onnx(tmp_path / "m.onnx")
    clips = [n for n in prep.model.graph.node if n.op_type == "Clip"]
    # Q(6) < 127 only when the output range is wider than 6
    assert len(clips) == (1 if out_scale == 0.05 else 0)
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "out")
    assert m["ops"]["int_conv2d"] == 1 and m["ops"]["float_conv2d"] == 0 and m["float_islands"] == []
    import tvm
    from tvm import relax

    x = (np.random.default_rng(0).standard_normal((4, 3, 8, 8)) * 3).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    assert ours.max() <= 6.0 + 1e-6 and ref.max() <= 6.0 + 1e-6
    assert (np.rint(np.abs(ours - ref) / output_step(tmp_path / "m.onnx")) == 0).mean() >= 0.999
