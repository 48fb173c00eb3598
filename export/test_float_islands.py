"""Float islands (--allow-float): an op with no integer form names itself and the flag; with the flag it stays in
float between DequantizeLinear and QuantizeLinear, and onnxruntime, the reference and TVM agree."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from plateau.errors import PlateauError
from plateau.export import QuantConfig, quantize_model, to_float_onnx, to_qdq_onnx
from plateau.export.onnx_reader import read_onnx
from plateau.export.validate import compare_logits, ort_quant_points, ort_session


class Islands(nn.Module):
    """conv -> GELU -> conv -> Hardswish -> x * sigmoid(x) -> pool -> LayerNorm -> fc -> Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.GELU()
        self.c2, self.hs = nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish()
        self.pool, self.ln, self.fc, self.sm = nn.AdaptiveAvgPool2d(1), nn.LayerNorm(8), nn.Linear(8, 10), nn.Softmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hs(self.c2(self.act(self.c1(x))))
        x = x * torch.sigmoid(x)
        return self.sm(self.fc(self.ln(torch.flatten(self.pool(x), 1))))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = Islands().eval()
    with torch.no_grad():
        m.ln.weight.uniform_(0.5, 1.5)
        m.ln.bias.uniform_(-0.2, 0.2)
    m.plateau_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
    return m


def test_without_the_flag_the_error_names_module_op_and_flag(model):
    """GELU, LayerNorm and Softmax are islands by default (a transformer's); the Hardswish needs the flag."""
    with pytest.raises(PlateauError, match=r"module 'hs' \(Hardswish\).*--allow-float"):
        quantize_model(model, [torch.randn(8, 3, 16, 16)], QuantConfig())


def test_islands_match_onnxruntime(model, tmp_path):
    torch.manual_seed(1)
    ref = quantize_model(model, [torch.randn(64, 3, 16, 16)], QuantConfig(allow_float=True, exact_islands=False))
    kinds = [n.attrs["kind"] for n in ref.graph.nodes if n.op == "float"]
    assert kinds == ["gelu", "hardswish", "sigmoid", "layer_norm", "softmax"]
    qdq = to_qdq_onnx(ref)
    ops = {n.op_type for n in qdq.graph.node}
    assert {"Gelu", "HardSwish", "Sigmoid", "LayerNormalization", "Softmax"} <= ops

    # Every quantization point: onnxruntime's integer tensor against the reference's.
    x = torch.randn(64, 3, 16, 16)
    got = ort_quant_points(qdq, list(ref.acts))(x.numpy())
    islands = {n.name for n in ref.graph.nodes if n.op == "float"}
    for name, want in ref.intermediates(x).items():
        d = np.abs(got[f"{name}.q"].astype(np.int64) - want.numpy().astype(np.int64).reshape(got[f"{name}.q"].shape))
        # An island may round a near-tie the other way: onnxruntime's float ops are not torch's, and it fuses
        # DQ -> Softmax -> Q into its lookup-table QLinearSoftmax. One step at most; integer layers stay exact.
        assert d.max() <= 1 and (d == 0).mean() >= (0.9 if name in islands else 0.999), (name, (d != 0).mean())
    c = compare_logits(got["logits"], ref(x).numpy(), ref.output_step)
    assert c["max_steps"] <= 1 and c["top1_agreement"] >= 0.98, c

    onnx.save(to_float_onnx(ref), tmp_path / "f.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(ort_session(tmp_path / "f.onnx").run(None, {"input": x.numpy()})[0],
                                   model(x).numpy(), atol=1e-5)


def test_islands_become_their_exact_forms(model):
    """By default GELU, Hardswish and Sigmoid are lookup tables of their own float32 islands (the same integers as
    the islands on every input), LayerNorm and Softmax are computed in float64 from exact integer sums, and
    onnxruntime computes every one of them exactly as the reference does."""
    torch.manual_seed(1)
    calib = [torch.randn(64, 3, 16, 16)]
    tables = quantize_model(model, calib, QuantConfig(allow_float=True))
    floats = quantize_model(model, calib, QuantConfig(allow_float=True, exact_islands=False))
    assert [(n.op, n.attrs["kind"]) for n in tables.graph.nodes if "kind" in n.attrs] == [
        ("lut", "gelu"), ("lut", "hardswish"), ("lut", "sigmoid"), ("exact_layernorm", "layer_norm"),
        ("exact_softmax", "softmax")]
    x = torch.randn(64, 3, 16, 16)
    mid_t, mid_f = tables.intermediates(x), floats.intermediates(x)
    for name in ("act", "hs"):  # the island and its table, on the same integer inputs
        torch.testing.assert_close(mid_t[name], mid_f[name], rtol=0, atol=0)
    qdq = to_qdq_onnx(tables)
    assert {"Gelu", "HardSwish", "Sigmoid"}.isdisjoint({n.op_type for n in qdq.graph.node})
    got = ort_quant_points(qdq, list(tables.acts))(x.numpy())
    for name in tables.acts:
        np.testing.assert_array_equal(got[f"{name}.q"].astype(np.int64).reshape(mid_t[name].shape),
                                      mid_t[name].numpy().astype(np.int64), err_msg=name)


def _float_onnx_with_sigmoid(path) -> None:
    # 10 output channels: one logit per class of the synthetic data it is exported with (export checks the count)
    w = helper.make_tensor("w", TensorProto.FLOAT, [10, 3, 3, 3], np.random.default_rng(0).standard_normal(270) * 0.3)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["g"], name="the_sigmoid"),
             helper.make_node("GlobalAveragePool", ["g"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flat", axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), path)


def test_onnx_reader_keeps_sigmoid_in_float(tmp_path):
    _float_onnx_with_sigmoid(tmp_path / "g.onnx")
    with pytest.raises(PlateauError, match=r"'the_sigmoid' \(Sigmoid\).*--allow-float"):
        read_onnx(tmp_path / "g.onnx")
    g = read_onnx(tmp_path / "g.onnx", allow_float=True)
    assert [(n.op, n.attrs.get("kind")) for n in g.nodes][1:3] == [("conv", None), ("float", "sigmoid")]


@pytest.mark.slow
def test_cli_export_and_compile_list_the_island(tmp_path):
    """`plateau export --onnx` refuses the Sigmoid in one line, then with --allow-float writes it as an island
    that `plateau compile --allow-float` keeps and lists."""
    _float_onnx_with_sigmoid(tmp_path / "g.onnx")
    cmd = [sys.executable, "-m", "plateau", "export", "--run", "r", "--onnx", "g.onnx", "--data", "synthetic",
           "--calib-images", "64", "--eval-limit", "64"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'the_sigmoid' (Sigmoid)" in p.stderr and "--allow-float" in p.stderr, p.stderr
    p = subprocess.run([*cmd, "--allow-float", "--no-exact-islands"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "r/export/report.json").read_text())
    assert rep["float_islands"] == [{"node": "the_sigmoid", "module": None, "kind": "sigmoid"}]
    assert rep["onnxruntime_vs_reference"]["max_steps"] <= 1
    p = subprocess.run([sys.executable, "-m", "plateau", "compile", "--run", "r", "--target", "host",
                        "--allow-float"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    man = json.loads((tmp_path / "r/compile/host/manifest.json").read_text())
    assert [(i["node"], i["op_type"]) for i in man["float_islands"]] == [("the_sigmoid", "Sigmoid")]
    assert man["ops"]["int_conv2d"] == 1 and man["ops"]["float_conv2d"] == 0


class _MobileBlock(nn.Module):
    """conv-BN-ReLU6 twice, then a residual-free head: MobileNetV2's activation, no --allow-float needed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.relu6(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_relu6_fuses_into_the_conv_and_stays_integer(tmp_path):
    """ReLU6 (module and function) fuses into the conv before it; the reference, onnxruntime and TVM agree."""
    import tvm
    from tvm import relax

    from plateau.compile import compile_onnx

    torch.manual_seed(0)
    m = _MobileBlock().eval()
    with torch.no_grad():
        m.b1.weight.mul_(4.0)  # some pre-activations beyond 6, so the clamp matters in the float model
    m.plateau_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}
    ref = quantize_model(m, [torch.randn(64, 3, 16, 16)], QuantConfig())
    convs = [n for n in ref.graph.nodes if n.op == "conv"]
    assert [n.attrs.get("clip") for n in convs] == [(0.0, 6.0), (0.0, 6.0)]
    assert not any(n.op in ("float", "relu") for n in ref.graph.nodes)
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        assert (ref.float_forward(x) - m(x)).abs().max() < 1e-4
    onnx.save(to_qdq_onnx(ref), tmp_path / "q.onnx")
    c = compare_logits(ort_session(tmp_path / "q.onnx").run(None, {"input": x.numpy()})[0], ref(x).numpy(),
                       ref.output_step)
    assert c["bit_exact"] >= 0.99 and c["max_steps"] <= 1, c
    man = compile_onnx(tmp_path / "q.onnx", "host", tmp_path / "host")
    assert man["float_islands"] == [] and man["ops"]["float_conv2d"] == 0
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "host" / "model.so")), tvm.cpu())
    c = compare_logits(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), ref(x).numpy(), ref.output_step)
    assert c["bit_exact"] == 1.0, c


@pytest.mark.parametrize("channels", [192, 33100])
def test_exact_layernorm_onnx_equals_the_reference_at_its_extremes(channels):
    """The exact LayerNorm as written to ONNX (its per-channel sums in int32 up to C = 33025 channels, in int64
    above) equals the reference's int64 arithmetic on onnxruntime, rows at the range's ends included (every d at
    +-255 and mixed extremes, where the int32 sums come closest to 2^31)."""
    from onnx import numpy_helper

    from plateau.ops.base import OnnxBuilder
    from plateau.ops.exact_islands import ExactLayerNorm
    from plateau.qgraph import ActQ, QNode
    from plateau.quant import INT8, UINT8

    rng = np.random.default_rng(channels)
    params = {"weight": torch.from_numpy(rng.uniform(0.5, 2, channels)), "eps": 1e-6,
              "bias": torch.from_numpy(rng.uniform(-1, 1, channels))}
    node = QNode("ln", "exact_layernorm", ["x"], attrs={"params": params})
    ain, aout = ActQ(0.05, 0, UINT8), ActQ(0.02, 3, INT8)
    x = np.stack([np.full(channels, 255), np.zeros(channels), np.resize([0, 255], channels),
                  rng.integers(0, 256, channels)]).astype(np.uint8)
    b = OnnxBuilder()
    ExactLayerNorm().to_onnx_int(b, node, "x", ain, aout, TensorProto.INT8, "y")
    assert {numpy_helper.to_array(t).dtype for t in b.inits if t.name.endswith(".c")} == \
        {np.dtype(np.int32 if channels * 255 * 255 < 2**31 else np.int64)}
    g = helper.make_graph(b.nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, list(x.shape))], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    got = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    want = ExactLayerNorm().run_int(node, [torch.from_numpy(x)], [ain], aout, None)
    np.testing.assert_array_equal(got.astype(np.int64), want.numpy().astype(np.int64))
