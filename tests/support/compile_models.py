"""Tiny QDQ ONNX models for the compile tests (16x16 inputs, a few hundred weights: seconds on two cores).

Test support, outside the installed package: tests import it as `from support import compile_models as fx`.

- `tiny_cnn_onnx`: a torch conv-bn-relu x2 + residual add + global average pool + linear, exported to ONNX
  (opset 17, dynamic batch), to be quantized with onnxruntime's quantize_static (`ort_qdq`).
- `exporter_style_qdq`: an opset-21 graph built by hand the way our exporter writes it: explicit Relu between
  Conv and QuantizeLinear, int32 biases with scale s_x * s_w, GlobalAveragePool and Flatten re-quantized with
  their input's parameters, Gemm transB=1, and 4-bit (INT4) or 8-bit weights. Activation scales come from a
  float run of the same graph over random calibration data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plateau.compile.onnx_prep import output_step
from plateau.quant import INT8, QType, choose_qparams, quantize_bias_np, quantize_np

__all__ = [
    "tiny_cnn_onnx", "tiny_mobile_onnx", "ort_qdq", "exporter_style_qdq", "single_conv_qdq",
    "calibration_batches",
    "compare_to_ort", "conv_tie_report", "HW", "save_graph",
]

HW = 16


def calibration_batches(n: int = 8, batch: int = 4, seed: int = 0, hw: int = HW) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 3, hw, hw)).astype(np.float32) for _ in range(n)]


def tiny_cnn_onnx(path: Path, seed: int = 0) -> Path:
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            z = torch.relu(self.b2(self.c2(y))) + y
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))

    torch.manual_seed(seed)
    net = Net().eval()
    for bn in (net.b1, net.b2):  # non-trivial BN statistics so folding matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated, still fine
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, torch.randn(1, 3, HW, HW), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False)
    return path


def tiny_mobile_onnx(path: Path, seed: int = 0) -> Path:
    """MobileNet-like: stride-2 stem, depthwise 3x3 + ReLU6, pointwise 1x1, MaxPool, Flatten, Linear."""
    import torch
    import torch.nn as nn

    def block(cin, cout, k, s, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

    torch.manual_seed(seed)
    net = nn.Sequential(block(3, 16, 3, 2), block(16, 16, 3, 1, groups=16), block(16, 24, 1, 1, act=False),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(24 * (HW // 4) ** 2, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, torch.randn(1, 3, HW, HW), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False)
    return path


def ort_qdq(fp32: Path, path: Path, activation: str = "s8", weight: str = "s8") -> Path:
    """onnxruntime's quantize_static QDQ of `fp32` on the fixed calibration batches
    (plateau.ort_quantizer)."""
    from plateau.ort_quantizer import ort_quantize

    batches = calibration_batches()
    return ort_quantize(fp32, np.concatenate(batches), path, "qdq", activation, weight, batch=len(batches[0]))


def _graph(w_bits: int, params: dict, act: dict | None) -> onnx.ModelProto:
    """The exporter-style graph; act=None gives the float twin (dequantized weights, every tensor an
    output)."""
    nodes, inits, outs = [], [], []

    def init(name, arr, dtype=None):
        t = numpy_helper.from_array(np.asarray(arr), name)
        if dtype is not None:  # 4-bit: make_tensor packs the values
            t = helper.make_tensor(name, dtype, np.shape(arr), np.asarray(arr).flatten().tolist())
        inits.append(t)
        return name

    def qdq(x, name, key=None):
        if act is None:
            outs.append(x)
            return x
        s, z = act[key or name]
        init(f"{name}_s", np.float32(s)), init(f"{name}_z", np.int8(z))
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                      [f"{name}_dq"]))
        return f"{name}_dq"

    def layer(op, x, x_name, name, relu, **attrs):
        wq, sw, b = params[name]
        if act is None:
            w_in = init(f"{name}_w",
                        (wq.astype(np.float32) * sw.reshape(-1, *[1] * (wq.ndim - 1))).astype(np.float32))
            b_in = init(f"{name}_b", b)
        else:
            wdt = TensorProto.INT4 if w_bits == 4 else None
            init(f"{name}_wq", wq, wdt), init(f"{name}_ws", sw)
            init(f"{name}_wz", np.zeros(len(sw), np.int8), wdt)
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws", f"{name}_wz"],
                                          [f"{name}_w"], axis=0))
            bq, sb = quantize_bias_np(b, act[x_name][0], sw)
            init(f"{name}_bq", bq), init(f"{name}_bs", sb), init(f"{name}_bz", np.zeros(len(sb), np.int32))
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_bq", f"{name}_bs", f"{name}_bz"],
                                          [f"{name}_b"], axis=0))
            w_in, b_in = f"{name}_w", f"{name}_b"
        y = f"{name}_out"
        nodes.append(helper.make_node(op, [x, w_in, b_in], [y], name=name, **attrs))
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"{name}_relu"], name=f"{name}_relu"))
            y = f"{name}_relu"
        return qdq(y, name)

    x = qdq("input", "input")
    a = layer("Conv", x, "input", "conv1", True, pads=[1, 1, 1, 1])
    b = layer("Conv", a, "conv1", "conv2", True, pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Add", [b, a], ["add"], name="add"))
    nodes.append(helper.make_node("Relu", ["add"], ["add_relu"], name="add_relu"))
    r = qdq("add_relu", "add")
    nodes.append(helper.make_node("GlobalAveragePool", [r], ["gap"], name="gap"))
    g = qdq("gap", "gap")
    nodes.append(helper.make_node("Flatten", [g], ["flat"], name="flatten"))
    f = qdq("flat", "flat", key="gap") if act is not None else "flat"
    y = layer("Gemm", f, "gap", "fc", False, transB=1)
    if act is not None:
        nodes.append(helper.make_node("Identity", [y], ["logits"]))
    else:
        nodes.append(helper.make_node("Identity", ["fc_out"], ["logits"]))
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    outputs = [vi("logits", ["N", 10])] + [vi(o, None) for o in outs if o != "fc_out"]
    graph = helper.make_graph(nodes, "exporter_style", [vi("input", ["N", 3, HW, HW])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def exporter_style_qdq(path: Path, w_bits: int = 4, seed: int = 0) -> Path:
    from plateau.export.validate import ort_session

    rng = np.random.default_rng(seed)
    wq_t = QType(w_bits, True, narrow=True)
    params = {}
    for name, shape in (("conv1", (8, 3, 3, 3)), ("conv2", (8, 8, 3, 3)), ("fc", (10, 8))):
        w = (rng.standard_normal(shape) * 0.4).astype(np.float32)
        amax = np.abs(w.reshape(shape[0], -1)).max(axis=1)
        sw, _ = choose_qparams(-amax, amax, wq_t, symmetric=True)
        params[name] = (quantize_np(w, sw, 0, wq_t, axis=0), sw,
                        (rng.standard_normal(shape[0]) * 0.1).astype(np.float32))

    # Calibrate activations on the float twin: min/max per tensor -> asymmetric int8 parameters.
    fm = _graph(w_bits, params, None)
    sess = ort_session(fm.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    lo, hi = {}, {}
    for xb in calibration_batches():
        for n, v in zip(names, sess.run(None, {"input": xb}), strict=True):
            lo[n], hi[n] = min(lo.get(n, 0.0), float(v.min())), max(hi.get(n, 0.0), float(v.max()))
    tensor = {"input": "input", "conv1": "conv1_relu", "conv2": "conv2_relu", "add": "add_relu", "gap": "gap",
              "fc": "logits"}
    act = {k: tuple(np.asarray(p).item() for p in choose_qparams(lo[t], hi[t], INT8, symmetric=False))
           for k, t in tensor.items()}
    onnx.save(_graph(w_bits, params, act), str(path))
    return path


def single_conv_qdq(path: Path, w_zp: int = 0, op: str = "Conv", name: str = "odd_conv",
                    pads: tuple = (1, 1, 1, 1), strides: tuple = (1, 1), dilations: tuple = (1, 1)) -> Path:
    """input -> Q/DQ -> Conv(DQ(W, zero point w_zp, uint8 when w_zp != 0)) -> Q/DQ -> output, or with
    op="QLinearConv" the same layer as one QLinearConv node (an op the TVM importer cannot convert)."""
    rng = np.random.default_rng(1)
    wdt = np.uint8 if w_zp else np.int8
    w = (rng.integers(-50, 50, (4, 3, 3, 3)) + w_zp).astype(wdt)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("xs", np.float32(0.02)), ("xz", np.int8(3)), ("w", w), ("ws", np.float32(0.01)), ("wz", wdt(w_zp)),
        ("ys", np.float32(0.05)), ("yz", np.int8(-5)))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"])]
    if op == "QLinearConv":
        nodes.append(helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"],
                                      name=name, pads=[1, 1, 1, 1]))
    else:
        nodes += [helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
                  helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"]),
                  helper.make_node("Conv", ["x", "wf"], ["y"], name=name, pads=list(pads),
                                   strides=list(strides),
                                   dilations=list(dilations)),
                  helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"])]
    nodes.append(helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["output"]))
    return save_graph(path, nodes, inits, ["N", 3, 8, 8], "single_conv")


def save_graph(path: Path, nodes: list, inits: list, input_shape: list, name: str = "g") -> Path:
    """Save a float-in, float-out opset-21 graph: input "input" of `input_shape`, output "output"."""
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, name, [vi("input", input_shape)], [vi("output", None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return Path(path)


def compare_to_ort(onnx_path: Path, so_path: Path, n_batches: int = 8, batch: int = 8, seed: int = 123,
                   hw: int = HW, optimize: bool = True) -> dict:
    """Run the compiled library (plain TVM) and onnxruntime on the same random inputs; count output steps.
    optimize=False: onnxruntime without graph optimizations (no QDQ fusion, float ops on dequantized
    values)."""
    import tvm
    from tvm import relax

    from plateau.export.validate import ort_session

    lib = tvm.runtime.load_module(str(so_path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    sess = ort_session(str(onnx_path), optimize=optimize)
    step = output_step(onnx_path)
    steps, top1 = [], []
    for x in calibration_batches(n_batches, batch, seed, hw):
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = sess.run(None, {"input": x})[0]
        steps.append(np.rint(np.abs(ours.astype(np.float64) - ref) / step).reshape(-1))
        top1.append(ours.argmax(axis=1) == ref.argmax(axis=1))
    d = np.concatenate(steps)
    return {"n": int(d.size), "exact": float((d == 0).mean()), "max_steps": int(d.max()),
            "top1": float(np.concatenate(top1).mean())}


def conv_tie_report(path: Path, n_batches: int = 4, batch: int = 8) -> list[dict]:
    """Per Conv layer: recompute onnxruntime's QuantizeLinear output from its own quantized input with exact
    integer arithmetic, and report where the two differ and how far those exact products are from a .5 tie.

    Where onnxruntime runs the conv in float (4-bit weights; S8S8 on x86 without `session.qdqisint8allowed`),
    its rounding can only disagree with the exact result on (near-)ties; a formula error would show up far
    from ties.
    """
    import torch

    from plateau.export.validate import ort_session

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            dtype = helper.np_dtype_to_tensor_dtype(inits[n.input[2]].dtype)
            model.graph.output.append(helper.make_tensor_value_info(n.output[0], dtype, None))
    sess = ort_session(model.SerializeToString(), int8_qdq=False)  # the float path is what this inspects
    names = [o.name for o in sess.get_outputs()]
    runs = [dict(zip(names, sess.run(None, {"input": x}), strict=True))
            for x in calibration_batches(n_batches, batch, seed=321)]
    got = lambda t: np.concatenate([r[t] for r in runs]).astype(np.int64)  # noqa: E731
    report = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq_x, dq_w = producer[conv.input[0]], producer[conv.input[1]]
        nxt = consumers[conv.output[0]][0]
        relu = nxt.op_type == "Relu"
        q = consumers[nxt.output[0]][0] if relu else nxt
        if q.op_type != "QuantizeLinear":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in conv.attribute}
        t, left, b_, r = a.get("pads", [0, 0, 0, 0])
        x = torch.tensor(got(dq_x.input[0]) - int(inits[dq_x.input[2]]), dtype=torch.float64)
        w = torch.tensor(inits[dq_w.input[0]].astype(np.float64))
        acc = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (left, r, t, b_)), w,
                                         stride=a.get("strides", [1, 1]), groups=a.get("group", 1)).numpy()
        if len(conv.input) > 2:
            acc = acc + inits[producer[conv.input[2]].input[0]].astype(np.float64).reshape(1, -1, 1, 1)
        s_x, s_y = inits[dq_x.input[1]], inits[q.input[1]]
        s_w = inits[dq_w.input[1]].reshape(1, -1, 1, 1)
        real = acc * np.float64(s_x) * s_w.astype(np.float64) / np.float64(s_y)
        # the default "float" requantize: float32(acc) * ((s_x * s_w) / s_y), all in float32
        f32 = acc.astype(np.float32) * ((np.float32(s_x) * s_w.astype(np.float32)) / np.float32(s_y))
        info, zp = np.iinfo(inits[q.input[2]].dtype), int(inits[q.input[2]])
        tie = np.abs(real - np.floor(real) - 0.5)
        row = {"layer": conv.name, "n": int(real.size)}
        for mode, v in (("exact", real), ("float", f32.astype(np.float64))):
            v = np.maximum(v, 0.0) if relu else v
            miss = np.clip(np.rint(v) + zp, info.min, info.max) != got(q.output[0])
            row[f"{mode}_mismatches"] = int(miss.sum())
            row[f"{mode}_max_tie_distance"] = float(tie[miss].max()) if miss.any() else 0.0
        report.append(row)
    return report
