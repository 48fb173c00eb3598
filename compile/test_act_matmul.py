"""Quantized matmul of two activations (attention's Q.K^T and P.V): lowered to an integer batched matmul, equal to
onnxruntime's integer QLinearMatMul."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from plateau.compile import _fixtures as fx
from plateau.compile import compile_onnx
from plateau.export.validate import ort_session


def _attention_scores_qdq(path, a_dtype=np.int8) -> None:
    """input [N, 2, 8, 16] -> Q -> DQ -> (A) ; A @ transpose(A) -> Q -> DQ: scores of 2 heads, 8 tokens, 16 dims."""
    zp = a_dtype(3 if a_dtype == np.int8 else 120)
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("s", np.float32(0.04)), ("z", zp), ("ys", np.float32(0.1)), ("yz", np.int8(-2)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["a"]),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]),
             helper.make_node("DequantizeLinear", ["qt", "s", "z"], ["bt"]),
             helper.make_node("MatMul", ["a", "bt"], ["scores"], name="qk"),
             helper.make_node("QuantizeLinear", ["scores", "ys", "yz"], ["sq"]),
             helper.make_node("DequantizeLinear", ["sq", "ys", "yz"], ["output"])]
    fx.save_graph(path, nodes, inits, ["N", 2, 8, 16], "qk")


@pytest.mark.parametrize("a_dtype", [np.int8, np.uint8])
def test_activation_matmul_is_integer_and_matches_onnxruntime(tmp_path, a_dtype):
    _attention_scores_qdq(tmp_path / "m.onnx", a_dtype)
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "out")
    assert m["ops"]["int_matmul"] == 1 and m["ops"]["float_matmul"] == 0 and m["float_islands"] == [], m["ops"]
    x = (np.random.default_rng(0).standard_normal((3, 2, 8, 16)) * 1.5).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    steps = np.rint(np.abs(ours - ref) / fx.output_step(tmp_path / "m.onnx"))
    assert ours.shape == (3, 2, 8, 8) and steps.max() <= 1 and (steps == 0).mean() >= 0.999, steps.max()
