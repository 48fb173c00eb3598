"""The manifest lists every float island (a Softmax kept between DQ and Q), and requant="fixed" (integer-only
multiplier and shift) is checked against Plateau's reference on a whole exported model and documented in the
manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import helper, numpy_helper
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.compile.onnx_prep import output_step

export = pytest.importorskip("plateau.export")


def _softmax_qdq(path) -> None:
    """input -> Q -> DQ -> MaxPool -> Q -> DQ -> Softmax -> Q -> DQ -> output: MaxPool lowers, Softmax
    stays."""
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("s", np.float32(0.05)), ("z", np.int8(-3)), ("so", np.float32(1 / 256)), ("zo", np.int8(-128)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s", "z"], ["d0"]),
             helper.make_node("MaxPool", ["d0"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q1"]),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
             helper.make_node("Softmax", ["d1"], ["sm"], name="the_softmax", axis=1),
             helper.make_node("QuantizeLinear", ["sm", "so", "zo"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "so", "zo"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 4, 8, 8], "softmax")


def test_manifest_lists_softmax_float_island(tmp_path):
    from plateau.export.validate import ort_session

    _softmax_qdq(tmp_path / "m.onnx")
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "out")  # no allow_float: not a conv/matmul
    assert m["float_islands"] == [{"node": "the_softmax", "op_type": "Softmax", "relax_op": "nn.softmax",
                                   "kind": "float_op"}]
    assert "float_op:nn.max_pool2d" not in m["ops"]  # max pooling runs on the integers
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_session(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    assert np.abs(ours - ref).max() <= 1 / 256 + 1e-7  # float softmax: one step at most (exp rounding)


@pytest.fixture(scope="module")
def small_cnn_w8a8(tmp_path_factory):
    from plateau.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", width=8).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    calib = [torch.tensor(x) for x in fx.calibration_batches(4, 8, hw=32)]
    ref = export.quantize_model(model, calib, export.QuantConfig.from_bits("W8A8"))
    path = tmp_path_factory.mktemp("fixed") / "model_qdq.onnx"
    onnx.save(export.to_qdq_onnx(ref), str(path))
    return ref, path


def test_fixed_point_requant_matches_reference(small_cnn_w8a8, tmp_path):
    """Integer-only requantize against the reference's float32 multiplier: every layer may differ by one step
    on near-ties only, so the logits stay within one step, almost all bit-exact, with the same top-1."""
    ref, path = small_cnn_w8a8
    m = compile_onnx(path, "host", tmp_path, requant="fixed")
    assert m["requantize"]["mode"] == "fixed" and "requant_multiplier" in m["requantize"]["conv_matmul"]
    assert m["config"]["requant"] == "fixed" and m["float_islands"] == []
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "model.so")), tvm.cpu())
    step = output_step(path)
    diffs, agree = [], []
    for x in fx.calibration_batches(8, 8, seed=99, hw=32):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        with torch.no_grad():
            want = ref(torch.tensor(x)).numpy()
        diffs.append(np.rint(np.abs(ours.astype(np.float64) - want) / step).reshape(-1))
        agree.append(ours.argmax(1) == want.argmax(1))
    d = np.concatenate(diffs)
    stats = {"n": int(d.size), "exact": float((d == 0).mean()), "max_steps": int(d.max()),
             "top1": float(np.concatenate(agree).mean())}
    print(f"fixed vs reference: {json.dumps(stats)}")
    assert stats["exact"] >= 0.98 and stats["max_steps"] <= 2 and stats["top1"] >= 0.98, stats


def test_fixed_requantize_matches_integer_oracle():
    """The fixed-point tail against Python-integer arithmetic with plateau.quant.requant_multiplier, per
    channel; and against the float32 reference multiplier: different only within 1e-6 of a .5 tie."""
    from plateau.compile._common import Multiplier, requantize
    from plateau.quant import INT8, conv_multiplier, requant_multiplier

    rng = np.random.default_rng(3)
    s_x, s_y = np.float32(0.021), np.float32(0.047)
    s_w = rng.uniform(1e-3, 2e-2, 4).astype(np.float32)
    acc = rng.integers(-60000, 60000, (16, 4)).astype(np.int32)
    acc[0] = np.rint(0.5 / (s_x * s_w.astype(np.float64) / s_y)).astype(np.int32)  # near ties
    bb = relax.BlockBuilder()
    a = relax.Var("acc", relax.TensorType((16, 4), "int32"))
    with bb.function("main", [a]):
        with bb.dataflow():
            out = bb.emit_output(requantize(a, Multiplier.for_product(s_x, s_w, s_y), 5, INT8,
                                            INT8.qmin, (4,),
                                            "fixed"))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(acc)).numpy().astype(int)
    mult, shift = requant_multiplier(np.float64(s_x) * s_w.astype(np.float64) / np.float64(s_y))
    want = np.array([[(int(v) * int(mult[c]) + (1 << (30 + int(shift[c])))) >> (31 + int(shift[c]))
                      for c, v in enumerate(row)] for row in acc]) + 5
    np.testing.assert_array_equal(ours, np.clip(want, -128, 127))
    y32 = acc.astype(np.float32) * conv_multiplier(s_x, s_w, s_y)
    ref = np.clip(np.rint(y32) + 5, -128, 127)
    differ = ours != ref
    assert np.abs(ours - ref).max() <= 1
    y = y32[differ]
    assert np.all(np.abs(np.abs(y - np.trunc(y)) - 0.5) < 1e-6 * np.abs(y) + 1e-3)
