"""The integer-lowering pass: apply every rewrite to every Relax function, then report what stayed float.

    >>> mod = relax_onnx.from_onnx(onnx_model, keep_params_in_input=False)
    >>> mod = lower_qdq(mod)              # conv2d / matmul of quantized layers now run on int8 -> int32
    >>> op_counts(mod)["float_conv2d"]    # 0 when every layer was quantized and lowerable
"""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.relax.dpl import rewrite_call

from . import (  # noqa: F401  (each file registers its rewrite in rewrite_registry.REWRITES)
    rewrite_act_matmul,
    rewrite_binary,
    rewrite_concat,
    rewrite_conv,
    rewrite_matmul,
    rewrite_passthrough,
    rewrite_pool,
    rewrite_quantize_up,
    rewrite_requant,
)
from ._common import REQUANT_MODES
from .rewrite_registry import REWRITES, rewrites

__all__ = ["lower_qdq", "op_counts", "float_compute_calls", "float_ops", "REWRITES"]

# First ("pre" rewrites), until nothing changes: move per-tensor dequantizes below pass-through ops (reshape,
# transpose, max pooling, ...) and cancel the quantize(dequantize()) pairs that then meet, so every compute op
# below sees dequantize(integer tensor) as its input. Then the "compute" rewrites, each matching a disjoint root
# (the quantize after its own op).
_MAX_PRE_ROUNDS = 16
_COMPUTE = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}


def lower_qdq(mod: tvm.IRModule, requant: str = "float") -> tvm.IRModule:
    """Rewrite the quantized patterns of every Relax function in `mod` into integer arithmetic: conv2d,
    matmul, mean (GlobalAveragePool), add / multiply, concat, and the pass-through ops between them.

    `requant` chooses the requantize step: "float" (float32 multiplier, as onnxruntime's fused kernels),
    "float64" (the exact product) or "fixed" (int32 multiplier and shift, integer-only). Patterns whose
    preconditions fail are left as they are.
    """
    if requant not in REQUANT_MODES:
        raise ValueError(f"requant must be one of {REQUANT_MODES}, got {requant!r}")
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        for _ in range(_MAX_PRE_ROUNDS):
            before = func
            for rewrite_cls in rewrites("pre"):
                rw = rewrite_cls(requant)
                func = rewrite_call(rw.pattern, rw, func)
            if func.same_as(before):  # rewrite_call returns its input when nothing matched
                break
        for rewrite_cls in rewrites("compute"):
            rw = rewrite_cls(requant)
            func = rewrite_call(rw.pattern, rw, func)
        out[gv] = func
    # The dequantized float weights the rewrites bypassed are now dead: drop them so they are not built.
    return relax.transform.DeadCodeElimination()(out)


def _calls(mod: tvm.IRModule):
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and hasattr(value.op, "name"):
                    yield binding.var, value


def float_compute_calls(mod: tvm.IRModule) -> list[tuple[str, relax.Call]]:
    """(kind, call) for each conv2d / matmul whose data input is floating point."""
    found = []
    for _, call in _calls(mod):
        kind = _COMPUTE.get(call.op.name)
        if kind and "float" in str(call.args[0].ty.dtype):
            found.append((kind, call))
    return found


# ops that read only the shape of their argument: never a float computation, whatever the argument's type
SHAPE_ONLY = ("relax.shape_of",)


def float_ops(mod: tvm.IRModule) -> list[tuple[str, relax.Call]]:
    """(relax op name, call) for each op that computes on dequantized float values: everything downstream of a
    relax.dequantize up to the next quantize (or the function output), other than dequantize itself.

    After lower_qdq these are the float islands a model keeps on purpose (Softmax, LayerNorm, GELU between a
    dequantize and a quantize) or a pattern that could not be lowered. The requantize tails the rewrites emit
    start from integer accumulators, so they are not counted.
    """
    tainted: set = set()
    found = []
    for var, call in _calls(mod):
        name = call.op.name
        if name in SHAPE_ONLY:
            continue  # reads a tensor's shape, never its values (a Gather index from a dynamic batch)
        if name == "relax.dequantize":
            tainted.add(var)
        elif name != "relax.quantize" and any(_refs(a, tainted) for a in call.args):
            tainted.add(var)
            found.append((name.removeprefix("relax."), call))
    return found


def _refs(arg: relax.Expr, tainted: set) -> bool:
    if isinstance(arg, relax.Tuple):
        return any(_refs(f, tainted) for f in arg.fields)
    return arg in tainted


def op_counts(mod: tvm.IRModule) -> dict[str, int]:
    """Counts of integer / float conv2d and matmul, and of the float ops that read dequantized tensors
    (add, mean, pooling...: the float islands between a dequantize and the next quantize)."""
    counts: Counter = Counter()
    producer: dict = {}
    for var, call in _calls(mod):
        producer[var] = call.op.name
        kind = _COMPUTE.get(call.op.name)
        if kind:
            integer = "int" in str(call.args[0].ty.dtype)
            counts[f"{'int' if integer else 'float'}_{kind}"] += 1
        elif call.op.name not in ("relax.dequantize", "relax.quantize", *SHAPE_ONLY) and any(
            producer.get(a) == "relax.dequantize" for a in call.args
        ):
            counts[f"float_op:{call.op.name.removeprefix('relax.')}"] += 1
    for key in ("int_conv2d", "int_matmul", "float_conv2d", "float_matmul"):
        counts.setdefault(key, 0)
    return dict(sorted(counts.items()))
