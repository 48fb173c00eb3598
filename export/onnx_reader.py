"""Read an FP32 ONNX file (from torch.onnx, tf2onnx, ...) into a QGraph, so it is quantized like a torch model.

Supported: Conv (+ BatchNormalization folded into it), Gemm, MatMul with a constant weight (+ Add of a constant
bias), Relu, Add, Mul, GlobalAveragePool, MaxPool, AveragePool, Flatten / Reshape to (N, -1), Slice, Pad
(constant zero), Concat, Identity, Dropout. With allow_float also the float islands of float_ops.py (Gelu, Sigmoid,
Softmax, LayerNormalization, ...). Anything else is a PlateauError naming the node and its op type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from plateau.errors import PlateauError

from .float_ops import float_op_of_onnx
from .graph import QGraph, QNode

__all__ = ["read_onnx"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _sym_pads(node: onnx.NodeProto, pads: list[int]) -> list[int]:
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        raise PlateauError(f"node {node.name!r} ({node.op_type}): asymmetric padding {pads} is not supported")
    return list(pads[:half])


def read_onnx(path: str | Path, allow_float: bool = False) -> QGraph:
    path = Path(path)
    try:
        model = onnx.load(str(path))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise PlateauError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise PlateauError(f"{path}: expected one image input and one output, found {len(inputs)} and {len(g.output)}")
    dims = [d.dim_value or 1 for d in inputs[0].type.tensor_type.shape.dim]
    nodes = [QNode("input", "input", [])]
    alias = {inputs[0].name: "input"}
    users: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(consts[name], dtype=np.float32))

    def last() -> QNode:
        return nodes[-1]

    for i, n in enumerate(g.node):
        op, a, name = n.op_type, _attrs(n), n.name or f"{n.op_type.lower()}_{i}"
        name = name.replace("/", "_").replace(".", "_").strip("_") or f"n{i}"
        ins = [x for x in n.input if x and x not in consts]
        try:
            if op == "Constant":
                continue
            if op in ("Identity", "Dropout"):
                if not ins:  # an Identity of a constant is a constant
                    consts[n.output[0]] = consts[n.input[0]]
                else:
                    alias[n.output[0]] = alias[ins[0]]
                continue
            if op == "BatchNormalization":
                src = next(q for q in nodes if q.name == alias[ins[0]])
                if src.op != "conv" or users.get(ins[0], 0) != 1:
                    raise PlateauError(f"node {name!r} (BatchNormalization) does not follow a conv: not supported")
                gamma, beta, mean, var = (t(n.input[k]) for k in range(1, 5))
                k = gamma / torch.sqrt(var + a.get("epsilon", 1e-5))
                src.weight = src.weight * k.view(-1, 1, 1, 1)
                src.bias = (src.bias - mean) * k + beta
                alias[n.output[0]] = src.name
                continue
            if op == "Relu":
                src = next(q for q in nodes if q.name == alias[ins[0]])
                if src.op in ("conv", "linear", "add") and not src.relu and users.get(ins[0], 0) == 1:
                    src.relu = True
                    alias[n.output[0]] = src.name
                    continue
                q = QNode(name, "relu", [alias[ins[0]]])
            elif op == "Conv":
                w = t(n.input[1])
                k = list(a.get("kernel_shape", w.shape[2:]))
                q = QNode(name, "conv", [alias[ins[0]]], attrs={
                    "stride": list(a.get("strides", [1, 1])), "padding": _sym_pads(n, list(a.get("pads", [0] * 4))),
                    "dilation": list(a.get("dilations", [1, 1])), "groups": int(a.get("group", 1)), "kernel": k})
                q.weight = w
                q.bias = t(n.input[2]) if len(n.input) > 2 and n.input[2] else torch.zeros(w.shape[0])
            elif op == "Gemm":
                if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                    raise PlateauError(f"node {name!r} (Gemm): only alpha = beta = 1, transA = 0 is supported")
                w = t(n.input[1])
                q = QNode(name, "linear", [alias[ins[0]]])
                q.weight = w if a.get("transB", 0) else w.T.contiguous()
                q.bias = t(n.input[2]) if len(n.input) > 2 and n.input[2] else torch.zeros(q.weight.shape[0])
            elif op == "MatMul" and n.input[1] in consts:
                q = QNode(name, "linear", [alias[ins[0]]])
                q.weight = t(n.input[1]).T.contiguous()
                q.bias = torch.zeros(q.weight.shape[0])
            elif op == "Add" and len(ins) == 1 and last().op == "linear" and alias[ins[0]] == last().name:
                last().bias = last().bias + t(next(x for x in n.input if x in consts)).flatten()
                alias[n.output[0]] = last().name
                continue
            elif op in ("Add", "Mul") and len(ins) == 2:
                q = QNode(name, op.lower(), [alias[x] for x in ins])
            elif op == "GlobalAveragePool":
                q = QNode(name, "gap", [alias[ins[0]]])
            elif op in ("MaxPool", "AveragePool"):
                k = list(a["kernel_shape"])
                attrs = {"kernel": k, "stride": list(a.get("strides", k)),
                         "padding": _sym_pads(n, list(a.get("pads", [0] * 4))),
                         "dilation": list(a.get("dilations", [1, 1])), "ceil_mode": bool(a.get("ceil_mode", 0))}
                if op == "AveragePool":
                    attrs["count_include_pad"] = bool(a.get("count_include_pad", 0))
                q = QNode(name, "maxpool" if op == "MaxPool" else "avgpool", [alias[ins[0]]], attrs=attrs)
            elif op == "Flatten" and a.get("axis", 1) == 1:
                q = QNode(name, "flatten", [alias[ins[0]]])
            elif op == "Reshape" and n.input[1] in consts and list(consts[n.input[1]])[1:] == [-1]:
                q = QNode(name, "flatten", [alias[ins[0]]])
            elif op == "Slice":
                starts, ends = consts[n.input[1]].tolist(), consts[n.input[2]].tolist()
                axes = consts[n.input[3]].tolist() if len(n.input) > 3 else list(range(len(starts)))
                steps = consts[n.input[4]].tolist() if len(n.input) > 4 else [1] * len(starts)
                q = QNode(name, "slice", [alias[ins[0]]], attrs={
                    "axes": axes, "starts": starts, "ends": [min(e, 2**62) for e in ends], "steps": steps})
            elif op == "Pad" and a.get("mode", b"constant") in (b"constant", "constant"):
                pads = consts[n.input[1]].tolist()
                if len(n.input) > 2 and n.input[2] and float(consts[n.input[2]]) != 0.0:
                    raise PlateauError(f"node {name!r} (Pad): only zero padding is supported")
                r = len(pads) // 2
                torch_pad = []
                for ax in reversed(range(r)):
                    torch_pad += [pads[ax], pads[ax + r]]
                q = QNode(name, "pad", [alias[ins[0]]], attrs={"pad": torch_pad})
            elif op == "Concat":
                q = QNode(name, "cat", [alias[x] for x in ins], attrs={"dim": int(a["axis"])})
            elif (found := float_op_of_onnx(op, a, consts, list(n.input))) is not None and len(ins) == 1:
                if not allow_float:
                    raise PlateauError(f"cannot quantize node {name!r} ({op}) of {path}: no integer form; "
                                       "--allow-float keeps it in float between DequantizeLinear and QuantizeLinear")
                q = QNode(name, "float", [alias[ins[0]]], attrs={"kind": found[0], "params": found[1]})
            else:
                raise PlateauError(f"cannot quantize node {name!r} ({op}) of {path}: no quantized form")
        except (KeyError, StopIteration, IndexError):
            raise PlateauError(f"cannot read node {name!r} ({op}) of {path}: unsupported inputs") from None
        nodes.append(q)
        alias[n.output[0]] = q.name
    out = alias.get(g.output[0].name)
    if out is None:
        raise PlateauError(f"{path}: the graph output is not produced by a supported node")
    return QGraph(nodes, out, [1, *dims[1:]])
