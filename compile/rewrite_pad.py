"""Turn the importer's constant Pad (a call_tir of topi.nn.pad) back into relax.nn.pad, so the pad can run on
integers.

TVM's ONNX importer emits every constant-mode Pad as `call_tir(pad, (x,))` of a TIR function built by
topi.nn.pad: the pattern rewrites cannot see through it, and it would stay a float op on dequantized values
(ResNet-20's option-A shortcut: Slice then a channel Pad). The pads are read from the ONNX graph instead
(`onnx_constant_pads`, one entry per Pad node in graph order, which is the order the importer emits them) and
each call becomes `relax.nn.pad(x, pad_width, pad_value)`; rewrite_passthrough then moves the dequantize below
it.

Nothing changes unless the number of such calls equals the number of constant Pads with constant pads, and
each replacement has exactly the call's output shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from onnx import helper, numpy_helper
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call

__all__ = ["PadSpec", "onnx_constant_pads", "restore_pads"]


@dataclass(frozen=True)
class PadSpec:
    """relax pad_width ([before_0, after_0, before_1, after_1, ...]) and the constant value; None =
    unknown."""

    pad_width: tuple[int, ...] | None
    value: float = 0.0


def onnx_constant_pads(model: onnx.ModelProto) -> list[PadSpec]:
    """One PadSpec per constant-mode Pad node, in graph order (pad_width None when the pads are not
    constants)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    specs = []
    for node in model.graph.node:
        if node.op_type != "Pad":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("mode", b"constant") != b"constant":
            continue
        pads = attrs.get("pads") if len(node.input) < 2 else inits.get(node.input[1])
        value = attrs.get("value", 0.0)
        if len(node.input) > 2 and node.input[2]:
            value = inits[node.input[2]].item() if node.input[2] in inits else None
        has_axes = len(node.input) > 3 and bool(node.input[3])
        if pads is None or value is None or has_axes:
            specs.append(PadSpec(None))
            continue
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        n = len(pads) // 2
        specs.append(PadSpec(tuple(v for i in range(n) for v in (pads[i], pads[n + i])), float(value)))
    return specs


def _is_topi_pad(mod: tvm.IRModule, call: relax.Call) -> bool:
    gv = call.args[0]
    name = getattr(gv, "name_hint", "")
    is_pad_name = name == "pad" or (name.startswith("pad") and name[3:].isdigit())
    return is_pad_name and isinstance(mod[gv], tvm.tirx.PrimFunc)


def restore_pads(mod: tvm.IRModule, specs: list[PadSpec]) -> tvm.IRModule:
    """Replace the k-th topi pad call_tir of `main` with relax.nn.pad from specs[k] (see the module
    docstring)."""
    main = mod["main"]
    calls = [b.value for blk in main.body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"
             and _is_topi_pad(mod, b.value)]
    if not calls or len(calls) != len(specs):
        return mod
    pairs = list(zip(calls, specs, strict=True))

    def rewriter(expr: relax.Call, _m: dict) -> relax.Expr:
        if not isinstance(expr, relax.Call):
            return expr
        spec = next((s for c, s in pairs if c.same_as(expr)), None)
        args = expr.args[1].fields if isinstance(expr.args[1], relax.Tuple) else []
        if spec is None or spec.pad_width is None or len(args) != 1:
            return expr
        x = args[0]
        if len(spec.pad_width) != 2 * len(x.ty.shape):
            return expr
        new = relax.op.nn.pad(x, list(spec.pad_width), pad_value=spec.value, pad_mode="constant")
        want = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in expr.ty.shape]
        got = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d)
               for d in relax.BlockBuilder().normalize(new).ty.shape]
        return new if got == want else expr

    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    out["main"] = rewrite_call(is_op("relax.call_tir")(varg_default_wildcard=True), rewriter, main)
    return relax.transform.DeadCodeElimination()(out)
