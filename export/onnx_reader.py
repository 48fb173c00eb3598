"""Read an FP32 ONNX file (from torch.onnx, tf2onnx, ...) into a QGraph, so it is quantized like a torch model.

Each node is claimed by the op of the table (plateau/ops/) that lists its type in `onnx_types` and accepts its
form (`Op.from_onnx`): Conv, Gemm, MatMul with a constant weight, Add, Mul, GlobalAveragePool, MaxPool, AveragePool,
Flatten / Reshape to (N, -1), Slice, Pad (constant zero), Concat, Relu, Identity, Dropout; with allow_float also the
float islands (Gelu, Sigmoid, Softmax, LayerNormalization, ...). Graph-level folds happen here: BatchNormalization
into the conv before it, a Relu into the op before it, an Add of a constant into the matmul before it (its bias).
Anything else is a PlateauError naming the node and its op type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from plateau.errors import PlateauError
from plateau.ops import OPS, OnnxNode, Op
from plateau.qgraph import QGraph, QNode

__all__ = ["read_onnx", "graph_constants"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ops_by_type() -> dict[str, list[Op]]:
    table: dict[str, list[Op]] = {}
    for _, op in OPS.items():
        for t in op.onnx_types:
            table.setdefault(t, []).append(op)
    return table


def _fold_batchnorm(src: QNode, r: OnnxNode) -> None:
    gamma, beta, mean, var = (r.tensor(r.node.input[k]) for k in range(1, 5))
    k = gamma / torch.sqrt(var + r.attrs.get("epsilon", 1e-5))
    src.weight = src.weight * k.view(-1, 1, 1, 1)
    src.bias = (src.bias - mean) * k + beta


def graph_constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: its initializers and the outputs of its Constant nodes."""
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
    return consts


def read_onnx(path: str | Path, allow_float: bool = False) -> QGraph:
    path = Path(path)
    if path.is_dir():
        raise PlateauError(f"{path}: is a directory, not an ONNX file")
    if not path.is_file():
        raise PlateauError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise PlateauError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    g = model.graph
    consts = graph_constants(g)
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
    by_type = _ops_by_type()

    def node_of(tensor: str) -> QNode:
        return next(q for q in nodes if q.name == alias[tensor])

    for i, n in enumerate(g.node):
        op, name = n.op_type, n.name or f"{n.op_type.lower()}_{i}"
        name = name.replace("/", "_").replace(".", "_").strip("_") or f"n{i}"
        ins = [x for x in n.input if x and x not in consts]
        if op == "Constant":
            continue
        try:
            r = OnnxNode(n, name, _attrs(n), [alias[x] for x in ins], consts)
            if op == "BatchNormalization":
                src = node_of(ins[0])
                if src.op != "conv" or users.get(ins[0], 0) != 1:
                    raise PlateauError(f"node {name!r} (BatchNormalization) does not follow a conv: not supported")
                _fold_batchnorm(src, r)
                alias[n.output[0]] = src.name
                continue
            if op == "Relu":
                src = node_of(ins[0])
                if src.op != "input" and OPS.get(src.op).relu_fusable and not src.relu and users.get(ins[0], 0) == 1:
                    src.relu = True
                    alias[n.output[0]] = src.name
                    continue
            if op == "Add" and len(ins) == 1 and nodes[-1].op == "linear" and alias[ins[0]] == nodes[-1].name:
                # MatMul + Add of a constant: the bias of that matmul
                nodes[-1].bias = nodes[-1].bias + r.tensor(next(x for x in n.input if x in consts)).flatten()
                alias[n.output[0]] = nodes[-1].name
                continue
            q, claimed = None, None
            for cand in by_type.get(op, []):
                if cand.alias:
                    claimed = cand
                    break
                q = cand.from_onnx(r)
                if q is not None:
                    claimed = cand
                    break
            if claimed is not None and claimed.alias:
                if not ins:  # an Identity of a constant is a constant
                    consts[n.output[0]] = consts[n.input[0]]
                else:
                    alias[n.output[0]] = alias[ins[0]]
                continue
            if q is None:
                raise PlateauError(f"cannot quantize node {name!r} ({op}) of {path}: no quantized form")
            if claimed.float_island and not allow_float and claimed.needs_flag(q.attrs):
                raise PlateauError(f"cannot quantize node {name!r} ({op}) of {path}: no integer form; "
                                   "--allow-float keeps it in float between DequantizeLinear and QuantizeLinear")
        except ValueError as e:
            if isinstance(e, PlateauError):
                raise
            raise PlateauError(f"node {name!r} ({op}): {e}") from None
        except (KeyError, StopIteration, IndexError):
            raise PlateauError(f"cannot read node {name!r} ({op}) of {path}: unsupported inputs") from None
        nodes.append(q)
        alias[n.output[0]] = q.name
    out = alias.get(g.output[0].name)
    if out is None:
        raise PlateauError(f"{path}: the graph output is not produced by a supported node")
    return QGraph(nodes, out, [1, *dims[1:]])

