"""Load a QDQ ONNX file and put it in the form the Relax importer handles, before any TVM code runs.

- A file that is not ONNX, or an op the importer has no converter for, is a PlateauError naming the node.
- com.microsoft QuantizeLinear / DequantizeLinear (what onnxruntime writes for 4-bit types below opset 21)
  move to the default domain: same semantics, and the importer only knows the default one.
- Subgraphs computed from constants only (torch exports F.pad's pads as Constant -> Concat -> Reshape -> Cast,
  which the importer calls "dynamic pads") are folded into initializers with onnx's reference evaluator.
  QuantizeLinear / DequantizeLinear are never folded: the rewrites need to see them.
- Cast(INT4 initializer -> INT8) (and UINT4 -> UINT8), Plateau's widened layout for onnxruntime, is the same
  integers: its consumers read the 4-bit initializer itself, so the weight is still known (and packed) as
  4-bit.
- INT4 / UINT4 initializers are unpacked to INT8 / UINT8 (exact: same values). The importer cannot read packed
  4-bit tensors, and TVM miscompiles native int4 buffers (shared notes). A QuantizeLinear whose zero point was
  4-bit gets a Clip to the 4-bit range after it, so activations still saturate at -8..7 (or 0..15).
- Clip(y, lo, hi) -> QuantizeLinear (ReLU6 and friends) becomes QuantizeLinear(y) -> a Clip on the integers to
  [Q(lo), Q(hi)]: quantize is monotone, so the two are equal exactly, and the conv / matmul / add rewrites
  then see their QuantizeLinear directly. A clamp that covers the whole integer range is dropped.

`output_step` reads the quantization step of a QDQ file's output (what "one step" means when outputs are
compared).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from plateau.errors import PlateauError
from plateau.quant import QType, quantize_np

__all__ = ["PreparedModel", "prepare_onnx", "array_key", "output_step"]

_FOUR_BIT = {TensorProto.INT4: (TensorProto.INT8, QType(4, True)),
             TensorProto.UINT4: (TensorProto.UINT8, QType(4, False))}
_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def array_key(a: np.ndarray) -> str:
    """A content key for a constant, used to find which ONNX node a Relax weight came from."""
    a = np.ascontiguousarray(a)
    return hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


@dataclass
class PreparedModel:
    model: onnx.ModelProto
    # initializer name -> bits as stored in the file
    weight_bits: dict[str, int] = field(default_factory=dict)
    # array_key -> (node name, op type)
    weight_owner: dict[str, tuple[str, str]] = field(default_factory=dict)
    weight_bytes: int = 0  # bytes of quantized weights as stored in ONNX (4-bit counted as half a byte)
    compute_weight_bits: set[int] = field(default_factory=set)  # bit widths of conv / matmul weights


def _load(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if path.is_dir():
        raise PlateauError(f"{path}: is a directory, not an ONNX file")
    if not path.is_file():
        raise PlateauError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, RuntimeError... depending on how the bytes are wrong
        raise PlateauError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node or not model.graph.input:
        raise PlateauError(f"{path}: not an ONNX model (no graph nodes or inputs)")
    return model


def _check_ops(model: onnx.ModelProto, path: str | Path) -> None:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    for node in model.graph.node:
        if node.op_type not in known:
            raise PlateauError(
                f"{path}: node {node.name or '(unnamed)'!r} has op type {node.op_type!r} "
                f"(domain {node.domain or 'ai.onnx'!r}), which the TVM ONNX importer cannot convert"
            )


_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "If", "Loop", "Scan"}
_WIDENED = {TensorProto.INT4: TensorProto.INT8, TensorProto.UINT4: TensorProto.UINT8}


def _drop_widening_casts(graph: onnx.GraphProto) -> None:
    """Cast(4-bit initializer -> the 8-bit type of the same signedness) => the initializer (see the
    docstring)."""
    inits = {i.name: i.data_type for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if (node.op_type == "Cast" and node.input[0] in inits and _WIDENED.get(inits[node.input[0]]) == to
                and node.output[0] not in outputs):
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if not alias:
        return
    for node in kept:
        for k, name in enumerate(node.input):
            node.input[k] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _fold_constants(model: onnx.ModelProto) -> None:
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    opsets = list(model.opset_import)
    kept = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if (node.op_type in _NEVER_FOLD or node.domain not in ("", "ai.onnx")
                or not all(i in const for i in ins)):
            kept.append(node)
            continue
        vi = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(const[i].dtype), None)
              for i in ins]
        outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output]
        one = helper.make_model(helper.make_graph([node], "fold", vi, outs), opset_imports=opsets)
        try:
            values = ReferenceEvaluator(one).run(None, {i: const[i] for i in ins})
        except Exception:  # an op the reference cannot run: leave it to the importer
            kept.append(node)
            continue
        for name, v in zip(node.output, values, strict=True):
            const[name] = np.asarray(v)
            graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    del graph.node[:]
    graph.node.extend(kept)


_ZP_TYPES = {TensorProto.INT8: QType(8, True), TensorProto.UINT8: QType(8, False),
             TensorProto.INT4: QType(4, True), TensorProto.UINT4: QType(4, False)}


def _fold_clip_into_quantize(graph: onnx.GraphProto) -> None:
    """Clip(y, lo, hi) -> QuantizeLinear(s, zp)  =>  QuantizeLinear(y) -> Clip(q, Q(lo), Q(hi)) (module doc).

    Only a Clip whose one consumer is the QuantizeLinear, with constant bounds and a per-tensor scale."""
    inits = {i.name: i for i in graph.initializer}
    nodes = [onnx.NodeProto() for _ in graph.node]  # copies: stable objects to edit, written back at the end
    for copy, n in zip(nodes, graph.node, strict=True):
        copy.CopyFrom(n)
    index = {o: k for k, n in enumerate(nodes) for o in n.output}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    const = lambda name: numpy_helper.to_array(inits[name]) if name in inits else None  # noqa: E731
    dropped: set[int] = set()
    after: dict[int, onnx.NodeProto] = {}
    for k, q in enumerate(nodes):
        clip = nodes[index[q.input[0]]] if q.input and q.input[0] in index else None
        if q.op_type != "QuantizeLinear" or clip is None or clip.op_type != "Clip" or len(q.input) < 3:
            continue
        if uses.get(clip.output[0], 0) != 1 or clip.output[0] in outputs:
            continue
        bounds = [clip.input[i] if len(clip.input) > i and clip.input[i] else None for i in (1, 2)]
        if (any(b is not None and b not in inits for b in bounds) or q.input[1] not in inits
                or q.input[2] not in inits):
            continue
        s, zp_init = const(q.input[1]), inits[q.input[2]]
        qt = _ZP_TYPES.get(zp_init.data_type)
        if qt is None or s.size != 1:
            continue
        zp = int(numpy_helper.to_array(zp_init).astype(np.int64).reshape(-1)[0])
        s0 = s.reshape(())
        lo = qt.qmin if bounds[0] is None else int(quantize_np(const(bounds[0]).reshape(()), s0, zp, qt))
        hi = qt.qmax if bounds[1] is None else int(quantize_np(const(bounds[1]).reshape(()), s0, zp, qt))
        q.input[0] = clip.input[0]
        dropped.add(index[clip.output[0]])
        if lo > qt.qmin or hi < qt.qmax:
            dt = np.int8 if zp_init.data_type in (TensorProto.INT8, TensorProto.INT4) else np.uint8
            out = q.output[0]
            names = (f"{out}__clip_lo", f"{out}__clip_hi", f"{out}__unclipped")
            graph.initializer.extend([numpy_helper.from_array(np.array(lo, dt), names[0]),
                                      numpy_helper.from_array(np.array(hi, dt), names[1])])
            q.output[0] = names[2]
            after[k] = helper.make_node("Clip", [names[2], names[0], names[1]], [out],
                                            name=f"{clip.name or out}__on_integers")
    if not dropped:
        return
    kept = []
    for k, n in enumerate(nodes):
        if k in dropped:
            continue
        kept.append(n)
        if k in after:
            kept.append(after[k])
    del graph.node[:]
    graph.node.extend(kept)


def prepare_onnx(path: str | Path) -> PreparedModel:
    """Load, check and normalize the model at `path` (see the module docstring)."""
    model = _load(path)
    _check_ops(model, path)
    prep = PreparedModel(model)
    graph = model.graph
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain == "com.microsoft":
            node.domain = ""
    _drop_widening_casts(graph)
    _fold_constants(model)
    _fold_clip_into_quantize(graph)
    inits = {i.name: i for i in graph.initializer}

    four_bit_zp: dict[str, QType] = {}
    for name, init in list(inits.items()):
        if init.data_type in _FOUR_BIT:
            wide, qt = _FOUR_BIT[init.data_type]
            arr = numpy_helper.to_array(init).astype(np.int8 if qt.signed else np.uint8)
            new = numpy_helper.from_array(arr, name)
            assert new.data_type == wide
            init.CopyFrom(new)
            prep.weight_bits[name] = 4
            four_bit_zp[name] = qt
        elif init.data_type in (TensorProto.INT8, TensorProto.UINT8):
            prep.weight_bits[name] = 8

    # Saturate 4-bit activations: QuantizeLinear now produces int8, so clip to the 4-bit range right after it.
    new_nodes = []
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in four_bit_zp:
            qt = four_bit_zp[node.input[2]]
            dt = np.int8 if qt.signed else np.uint8
            lo, hi, raw = f"{node.output[0]}__qmin", f"{node.output[0]}__qmax", f"{node.output[0]}__wide"
            graph.initializer.extend([numpy_helper.from_array(np.array(qt.qmin, dt), lo),
                                      numpy_helper.from_array(np.array(qt.qmax, dt), hi)])
            out = node.output[0]
            node.output[0] = raw
            new_nodes.append(helper.make_node("Clip", [raw, lo, hi], [out], name=f"{node.name}__4bit_clip"))
    del graph.node[:]
    graph.node.extend(new_nodes)

    # Who owns each weight: resolve input 1 of every compute node through DequantizeLinear / Transpose.
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type not in _COMPUTE_OPS or len(node.input) < 2:
            continue
        src, quantized = node.input[1], False
        while src in producer and producer[src].op_type in ("DequantizeLinear", "Transpose"):
            quantized |= producer[src].op_type == "DequantizeLinear"
            src = producer[src].input[0]
        if src in inits:
            arr = numpy_helper.to_array(inits[src])
            prep.weight_owner[array_key(arr)] = (node.name or node.output[0], node.op_type)
            if quantized:
                bits = prep.weight_bits.get(src, 8)
                prep.weight_bytes += (arr.size * bits + 7) // 8
                prep.compute_weight_bits.add(bits)
    return prep


def output_step(path: str | Path) -> float:
    """The quantization step of the graph output: the scale of the DequantizeLinear that produces it (through
    Identity nodes)."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = producer[model.graph.output[0].name]
    while node.op_type == "Identity":
        node = producer[node.input[0]]
    if node.op_type != "DequantizeLinear":
        raise PlateauError(f"{path}: the output comes from {node.op_type}, not a DequantizeLinear: "
                           "no output step")
    return float(inits[node.input[1]])
