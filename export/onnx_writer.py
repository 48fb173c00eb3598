"""Write the quantized graph as a QDQ ONNX model (opset 21), or the BN-folded float graph as FP32 ONNX.

Structure (every quantized operator's inputs are DequantizeLinear outputs, so consumers see one pattern):

    input -> QuantizeLinear -> DequantizeLinear -> Conv(., DQ(W_q int8|int4, s_w[Cout], axis 0),
                                                          DQ(b_q int32, s_x*s_w[Cout], axis 0)) [-> Relu]
          -> QuantizeLinear -> DequantizeLinear -> ...
    pass-through ops (MaxPool, Flatten, Slice, Pad, standalone Relu): DQ -> op -> Q with the same scale -> DQ
    the last layer's DequantizeLinear is the graph output "logits".

Weights are integer initializers (INT8, or INT4 packed by onnx's helpers), never float weights re-quantized at run
time. The file carries metadata: Plateau's format version, bits, calibration, source checkpoint hash.

Bit widths below 8 come in two layouts (`four_bit=`), with the same meaning:

    widened (default)   4-bit weights stay INT4 initializers (half a byte each) and go through Cast(INT8) before
                        their DequantizeLinear; activations below 8 bits are quantized to INT8 and clamped to their
                        range by a Clip on the integers:  QuantizeLinear(int8) -> Clip(qmin, qmax) -> DQ.
                        onnxruntime folds the Cast at load and fuses every conv into its integer kernels, so it
                        computes what the reference computes.
    native              DequantizeLinear straight off the INT4 initializer, QuantizeLinear to INT4 for 4-bit
                        activations (what onnxruntime's quantizer writes). onnxruntime has no integer kernel for
                        INT4 and runs those convs in float on dequantized values, which flips near-ties.

In both, an activation narrower than its container type (A2, A3, A5..A7) gets the Clip, so it saturates where the
reference saturates.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plateau.artifacts import FORMAT_VERSION
from plateau.ops import OPS, OnnxBuilder, clip_range
from plateau.quant import QType, pack_int4
from plateau.reference import FakeQuantModel

from .validate import ort_u8s8_pairs_fit

__all__ = ["to_qdq_onnx", "to_float_onnx", "OPSET", "INPUT_NAME", "OUTPUT_NAME", "FOUR_BIT_LAYOUTS"]

OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FOUR_BIT_LAYOUTS = ("widened", "native")


def _onnx_type(qt: QType) -> int:
    return {
        "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
        "int4": TensorProto.INT4, "uint4": TensorProto.UINT4, "int32": TensorProto.INT32,
    }[qt.storage]


def _container(qt: QType, four_bit: str) -> QType:
    """The ONNX type an activation of type `qt` is quantized to: INT4/UINT4 only for exactly 4 bits in the native
    layout (ONNX has no Clip on 4-bit tensors), else the 8-bit type of its signedness."""
    return qt if four_bit == "native" and qt.bits == 4 else QType(8, qt.signed)


def _int_initializer(name: str, values: np.ndarray, qt: QType) -> onnx.TensorProto:
    values = np.asarray(values)
    if qt.storage in ("int4", "uint4"):
        # Two values per byte in raw_data (the ONNX INT4 layout), so the file holds half a byte per weight.
        return helper.make_tensor(name, _onnx_type(qt), list(values.shape), pack_int4(values).tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(qt.np_dtype), name)


def _finish(b: OnnxBuilder, shape: list[int], n_out: int | None, meta: dict, name: str) -> onnx.ModelProto:
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *shape[1:]])
    out = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", n_out] if n_out else None)
    graph = helper.make_graph(b.nodes, name, [inp], [out], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="plateau")
    model.ir_version = 10
    meta = {"plateau.format_version": str(FORMAT_VERSION), **{k: str(v) for k, v in meta.items()}}
    helper.set_model_props(model, meta)
    # Strict shape inference and the full checker must pass; the inferred value_info is then dropped again, since
    # every consumer re-infers it and it would cost ~4% of an int4 file.
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    return model


def to_qdq_onnx(ref: FakeQuantModel, meta: dict | None = None, four_bit: str = "widened") -> onnx.ModelProto:
    """The QDQ ONNX graph of a fake-quant reference model; `four_bit` picks the layout below 8 bits (module doc).

    Each consumer gets its own DequantizeLinear (as onnxruntime's quantizer does): runtimes fuse DQ -> op -> Q
    into one integer kernel only when the DQ feeds that op alone.
    """
    if four_bit not in FOUR_BIT_LAYOUTS:
        raise ValueError(f"four_bit must be one of {', '.join(FOUR_BIT_LAYOUTS)}, got {four_bit!r}")
    g, b = ref.graph, OnnxBuilder()
    qout: dict[str, tuple[str, str, str]] = {}  # node -> (integer tensor, scale, zero point)
    qp: dict[str, tuple[str, str, QType]] = {}  # quant point -> (scale, zero point) initializer names, its type
    bounds: dict[tuple[int, int, str], tuple[str, str]] = {}  # (qmin, qmax, container) -> Clip bound initializers
    uses: dict[str, int] = {}

    def clip_bounds(qt: QType, box: QType) -> tuple[str, str]:
        key = (qt.qmin, qt.qmax, box.storage)
        if key not in bounds:
            bounds[key] = tuple(b.init(_int_initializer(f"clip.{box.storage}.{v}", np.asarray(v), box))
                                for v in (qt.qmin, qt.qmax))
        return bounds[key]

    def quant(src: str, n_name: str, qsource: str) -> None:
        s, z, qt = qp[qsource]
        box = _container(qt, four_bit)
        out = f"{n_name}.q"
        if (qt.qmin, qt.qmax) != (box.qmin, box.qmax):
            # Saturate at the activation's own range: a clamp on the integers, after a QuantizeLinear to `box`.
            b.node("QuantizeLinear", [src, s, z], [f"{n_name}.q_{box.storage}"], "")
            b.node("Clip", [f"{n_name}.q_{box.storage}", *clip_bounds(qt, box)], [out], "")
        else:
            b.node("QuantizeLinear", [src, s, z], [out], "")
        qout[n_name] = (out, s, z)

    def dq(src_node: str, consumer: str, out: str | None = None) -> str:
        q, s, z = qout[src_node]
        uses[src_node] = uses.get(src_node, 0) + 1
        out = out or f"{src_node}.dq{uses[src_node]}"
        b.node("DequantizeLinear", [q, s, z], [out], "")
        return out

    for n in g.nodes:
        if n.quantized_output:
            a = ref.acts[n.name]
            s = b.const_f32(f"{n.name}.s", np.float32(a.scale))
            z = b.init(_int_initializer(f"{n.name}.zp", np.asarray(a.zero_point), _container(a.qtype, four_bit)))
            qp[n.name] = (s, z, a.qtype)
        if n.op == "input":
            quant(INPUT_NAME, n.name, n.name)
            continue
        op = OPS.get(n.op)
        if op.integer_io:  # computed on the integers themselves (integer-only LayerNorm, Softmax, lookup tables)
            if four_bit == "native":
                raise ValueError("integer-only ops write 8-bit containers: use the widened 4-bit layout")
            src = g.quant_source(n.inputs[0])
            op.to_onnx_int(b, n, qout[n.inputs[0]][0], ref.acts[src], ref.acts[n.name],
                           _onnx_type(QType(8, ref.acts[n.name].qtype.signed)), f"{n.name}.q")
            qout[n.name] = (f"{n.name}.q", *qp[n.name][:2])
            continue
        if op.writes_integers:  # a constant: its integers are an initializer
            box = _container(ref.acts[n.name].qtype, four_bit)
            qi = b.init(_int_initializer(f"{n.name}.q", op.integers(n, ref.acts[n.name]), box))
            qout[n.name] = (qi, *qp[n.name][:2])
            continue
        ins = [dq(i, n.name) for i in n.inputs]
        w = bias = None
        if n.is_weighted:
            wq = ref.weights[n.name]
            wi = b.init(_int_initializer(f"{n.name}.wq", wq.q.numpy().astype(np.int32), wq.qtype))
            wt = wq.qtype
            if four_bit == "widened" and wq.qtype.storage in ("int4", "uint4"):
                # Stored at half a byte, read as the same integers in 8 bits (onnxruntime folds this at load).
                wt = QType(8, wq.qtype.signed)
                b.node("Cast", [wi], [f"{n.name}.w8"], "", to=_onnx_type(wt))
                wi = f"{n.name}.w8"
            ws = b.const_f32(f"{n.name}.ws", wq.scale.numpy())
            # Symmetric weights: the zero point input is left out (ONNX's default is 0 of the weight's type), but
            # for a Gemm: onnxruntime fuses it into its integer QGemm only when the zero point is given. Except
            # after unsigned activations with weights above 64: on x86 without VNNI onnxruntime's U8S8 kernels add
            # pairs of products in int16 (vpmaddubsw), which then saturates (validate.ort_u8s8_saturates), where
            # its float Gemm is off by at most a near-tie.
            exact_qgemm = ref.acts[n.attrs["_in_q"]].qtype.signed or ort_u8s8_pairs_fit(int(wq.q.abs().max()))
            wz = [b.init(_int_initializer(f"{n.name}.wz", np.zeros(wq.q.shape[0], np.int32), wt))] \
                if n.op == "linear" and exact_qgemm else []
            b.node("DequantizeLinear", [wi, ws, *wz], [f"{n.name}.w"], "", axis=0)
            bi = b.init(numpy_helper.from_array(wq.bias_q.numpy().astype(np.int32), f"{n.name}.bq"))
            # The bias scale is float32(s_x * s_w) by construction: written as that product of the two scales the
            # file already holds (runtimes fold it at load), not as a third per-channel table.
            s_x = qp[n.attrs["_in_q"]][0]
            if np.array_equal(np.float32(ref.acts[n.attrs["_in_q"]].scale) * wq.scale.numpy(), wq.bias_scale.numpy()):
                bs = f"{n.name}.bs"
                b.node("Mul", [s_x, ws], [bs], "")
            else:  # a reference whose bias scale was made otherwise keeps it as given
                bs = b.const_f32(f"{n.name}.bs", wq.bias_scale.numpy())
            b.node("DequantizeLinear", [bi, bs], [f"{n.name}.b"], "", axis=0)
            w, bias = f"{n.name}.w", f"{n.name}.b"
        pre = f"{n.name}.y"
        op.to_onnx(b, n, ins, pre, w, bias)
        a = ref.acts.get(n.name)
        # With the output zero point at qmin, saturation already clamps negatives: Q(relu(y)) == Q(y). Leaving the
        # Relu out lets runtimes fuse Conv/Add -> Q into one integer kernel.
        if n.relu and not (a is not None and a.zero_point == a.qtype.qmin):
            b.node("Relu", [pre], [f"{n.name}.relu"], "")
            pre = f"{n.name}.relu"
        if "clip" in n.attrs:  # ReLU6 / Hardtanh: left out when the output range lies inside it (Q saturates)
            qlo, qhi = clip_range(n, a)
            if qlo > a.qtype.qmin or qhi < a.qtype.qmax:
                lo, hi = (b.const_f32(f"{n.name}.clip_{k}", v)
                          for k, v in zip(("lo", "hi"), n.attrs["clip"], strict=True))
                b.node("Clip", [pre, lo, hi], [f"{n.name}.clip"], "")
                pre = f"{n.name}.clip"
        quant(pre, n.name, g.quant_source(n.name))
    dq(g.output, "output", OUTPUT_NAME)
    n_out = ref.weights[g.output].q.shape[0] if g.output in ref.weights else None
    meta = {"plateau.four_bit_layout": four_bit, **(meta or {})}
    return _finish(b, g.input_shape, n_out, meta, "plateau_qdq")


def to_float_onnx(ref: FakeQuantModel, meta: dict | None = None) -> onnx.ModelProto:
    """The BN-folded float32 graph (the FP32 baseline for onnxruntime and TVM)."""
    g, b = ref.graph, OnnxBuilder()
    name: dict[str, str] = {}
    for n in g.nodes:
        if n.op == "input":
            name[n.name] = INPUT_NAME
            continue
        w = bias = None
        if n.is_weighted:
            w = b.const_f32(f"{n.name}_weight", n.weight.numpy())
            bias = b.const_f32(f"{n.name}_bias", n.bias.numpy())
        out = OUTPUT_NAME if n.name == g.output and not n.relu and "clip" not in n.attrs else f"{n.name}_out"
        OPS.get(n.op).to_onnx(b, n, [name[i] for i in n.inputs], out, w, bias)
        if n.relu:
            r = OUTPUT_NAME if n.name == g.output and "clip" not in n.attrs else f"{n.name}_relu"
            b.node("Relu", [out], [r], f"{n.name}_Relu")
            out = r
        if "clip" in n.attrs:
            r = OUTPUT_NAME if n.name == g.output else f"{n.name}_clip"
            lo, hi = (b.const_f32(f"{n.name}_clip_{k}", v) for k, v in zip(("lo", "hi"), n.attrs["clip"], strict=True))
            b.node("Clip", [out, lo, hi], [r], f"{n.name}_Clip")
            out = r
        name[n.name] = out
    n_out = g.node(g.output).weight.shape[0] if g.node(g.output).is_weighted else None
    return _finish(b, g.input_shape, n_out, meta or {}, "plateau_fp32")


def metadata(model: onnx.ModelProto) -> dict:
    out = {p.key: p.value for p in model.metadata_props}
    if "plateau.config" in out:
        out["plateau.config"] = json.loads(out["plateau.config"])
    return out
