"""Quantized matmul of two activations (attention's Q.K^T and P.V): lowered to an integer batched matmul,
equal to onnxruntime's integer QLinearMatMul."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from onnx import helper, numpy_helper
from support import compile_models as fx
from tvm import relax

from plateau.compile import compile_onnx
from plateau.compile.onnx_prep import output_step
from plateau.export.validate import ort_session


def _attention_scores_qdq(path, a_dtype=np.int8, shape=(2, 8, 16)) -> None:
    """input [N, heads, tokens, dims] -> Q -> DQ -> (A) ; A @ transpose(A) -> Q -> DQ: attention scores (2
    heads, 8 tokens, 16 dims by default)."""
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
    fx.save_graph(path, nodes, inits, ["N", *shape], "qk")


@pytest.mark.parametrize("a_dtype", [np.int8, np.uint8])
def test_activation_matmul_is_integer_and_matches_onnxruntime(tmp_path, a_dtype):
    _attention_scores_qdq(tmp_path / "m.onnx", a_dtype)
    m = compile_onnx(tmp_path / "m.onnx", "host", tmp_path / "out")
    ops = m["ops"]
    assert ops["int_matmul"] == 1 and ops["float_matmul"] == 0 and m["float_islands"] == [], ops
    x = (np.random.default_rng(0).standard_normal((3, 2, 8, 16)) * 1.5).astype(np.float32)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "out" / "model.so")), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    steps = np.rint(np.abs(ours - ref) / output_step(tmp_path / "m.onnx"))
    assert ours.shape == (3, 2, 8, 8) and steps.max() <= 1 and (steps == 0).mean() >= 0.999, steps.max()


def test_large_activation_matmul_gets_the_row_schedule(tmp_path):
    """ViT-Tiny's attention shape (3 heads, 65 tokens, 64 dims): schedule_int_matmul takes the integer matmul
    (k outside the columns, 5 rows per k step, heads in parallel); the library equals TVM's unscheduled build
    on every value and onnxruntime within one step."""
    from plateau.compile.compiler import import_onnx, lower_for_target
    from plateau.compile.cpu_pipeline import legalize_passes
    from plateau.compile.cpu_schedule import schedule_int_matmul
    from plateau.compile.lower import lower_qdq
    from plateau.compile.targets import get_target
    from plateau.compile.tir_helpers import fresh_schedule

    path = tmp_path / "m.onnx"
    _attention_scores_qdq(path, np.int8, (3, 65, 64))
    tgt = get_target("host")
    t = tvm.target.Target(tgt.tvm_target)
    mod, _ = import_onnx(path)
    with t:
        from tvm.relax.backend.cpu_generic import pipeline as cpu
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(t) + legalize_passes(t) +
                                       [relax.transform.FuseOps(), relax.transform.FuseTIR()])(
            lower_for_target(lower_qdq(mod), tgt))
    (name,) = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("fused_matmul")]
    sch = fresh_schedule(mod[name])
    assert schedule_int_matmul(sch)
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.unroll(T.int64(5))" in script and "T.vectorized" in script
    assert re.search(r"for \w+, k in T\.grid", script), script  # k outside the 5 rows and the columns

    compile_onnx(path, "host", tmp_path / "sched")
    compile_onnx(path, "host", tmp_path / "plain", schedule="none")
    x = (np.random.default_rng(1).standard_normal((4, 3, 65, 64)) * 1.5).astype(np.float32)
    outs = [relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / d / "model.so")), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy() for d in ("sched", "plain")]
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = ort_session(path).run(None, {"input": x})[0]
    steps = np.rint(np.abs(outs[0] - ref) / output_step(path))
    assert steps.max() <= 1 and (steps == 0).mean() >= 0.999


def test_a_float_matmul_keeps_its_order():
    """schedule_int_matmul leaves a float matmul alone: reordering its sum would change the rounding."""
    from tvm import te

    from plateau.compile.cpu_schedule import schedule_int_matmul
    from plateau.compile.tir_helpers import fresh_schedule

    a, b = te.placeholder((4, 65, 64), "float32"), te.placeholder((4, 64, 65), "float32")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((4, 65, 65), lambda n, i, j: te.sum(a[n, i, k] * b[n, k, j], axis=k), name="matmul")
    sch = fresh_schedule(te.create_prim_func([a, b, c]))
    assert not schedule_int_matmul(sch)
