"""Fold an integer index chain into the table it indexes: take(T, f(x)) -> take(T', x) for an 8-bit x.

The exact GELU island (plateau/ops/exact_islands.py) is a table lookup whose index is an elementwise integer
function of one 8-bit tensor (the fc1 output: widen, subtract the zero point, wrap negatives by 256). TVM
computes that index as its own kernel and stores it as an int32/int64 tensor of the whole activation, then
gathers in a second kernel. Since x takes 256 values only, f can be evaluated on all of them at compile time:
T'[v + 128] = T[f(v)] (v + 0 for uint8 x). The lookup then reads x directly and, being injective, fuses into
the kernel that produces x (the fc1 matmul's epilogue): no index tensor, no separate kernel. Integer ops
only (numpy's wrap-around is TVM's), constants scalar; anything else leaves the take as it is.

    >>> mod = compose_tables(mod)      # Relax, before legalization
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir import TensorLoad

from ._common import const_np, mutate_relax_functions
from .tir_helpers import fresh_schedule, has_root, spatial_only

__all__ = ["compose_tables", "mark_table_lookups"]

ELEMWISE = 0  # TVM's OpPatternKind kElemWise

Values = Callable[[np.ndarray], np.ndarray]  # the chain's values for every value of its 8-bit input

_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
           "relax.maximum": np.maximum, "relax.minimum": np.minimum, "relax.bitwise_and": np.bitwise_and,
           "relax.bitwise_or": np.bitwise_or, "relax.bitwise_xor": np.bitwise_xor,
           "relax.less": np.less, "relax.less_equal": np.less_equal, "relax.greater": np.greater,
           "relax.greater_equal": np.greater_equal, "relax.equal": np.equal, "relax.not_equal": np.not_equal}
_BYTES = {"int8": np.arange(-128, 128).astype(np.int8), "uint8": np.arange(256).astype(np.uint8)}


def _integer(dtype: str) -> bool:
    return dtype == "bool" or dtype.startswith(("int", "uint"))


@relax.expr_functor.mutator
class _TableComposer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def _chain(self, expr: relax.Expr, depth: int = 0) -> tuple[Values, relax.Var | None] | None:
        """(values of expr as a function of its one 8-bit input, that input) or None."""
        v = const_np(expr)
        if v is not None:
            if v.size != 1 or not _integer(str(v.dtype)):
                return None
            scalar = v.reshape(())
            return (lambda _x: scalar), None
        if not isinstance(expr, relax.Var) or depth > 32:
            return None
        dtype = str(getattr(expr.ty, "dtype", ""))
        leaf = ((lambda x: x), expr) if dtype in _BYTES else None
        bound = self.lookup_binding(expr)
        if not (_integer(dtype) and isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)):
            return leaf
        name = bound.op.name
        args = [self._chain(a, depth + 1) for a in bound.args]
        if any(a is None for a in args):
            return leaf
        inputs = [v for _, v in args if v is not None]
        if any(not v.same_as(inputs[0]) for v in inputs):
            return leaf
        var = inputs[0] if inputs else None
        fns = [f for f, _ in args]
        if name == "relax.astype" and _integer(str(bound.attrs.dtype)):
            return (lambda x: fns[0](x).astype(dtype)), var
        if name in _BINARY:
            op = _BINARY[name]
            return (lambda x: np.asarray(op(fns[0](x), fns[1](x))).astype(dtype)), var
        if name == "relax.where":
            return (lambda x: np.where(fns[0](x), fns[1](x), fns[2](x)).astype(dtype)), var
        return leaf

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 (TVM's visitor name)
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"):
            return call
        table = const_np(call.args[0])
        found = self._chain(call.args[1])
        if table is None or table.ndim != 1 or found is None or found[1] is None:
            return call
        fn, x = found
        if x.same_as(call.args[1]) or str(x.ty.shape) != str(call.ty.shape):
            return call
        with np.errstate(over="ignore"):
            index = np.broadcast_to(fn(_BYTES[str(x.ty.dtype)]), (256,)).astype(np.int64)
        if index.min() < 0 or index.max() >= len(table):
            return call  # out of range ('fast' take): leave it to the original graph
        offset = 128 if str(x.ty.dtype) == "int8" else 0
        src = self._before_reshapes(x)
        at = relax.op.add(relax.op.astype(src, "int32"), relax.const(np.int32(offset), "int32"))
        self.count += 1
        out = relax.op.take(relax.const(table[index], str(table.dtype)), at, axis=0, mode="fast")
        return out if src.same_as(x) else relax.op.reshape(out, call.ty.shape)

    def _before_reshapes(self, x: relax.Var) -> relax.Var:
        """x's source through reshapes: the lookup is elementwise, so it can run before them, right after the
        kernel that makes the bytes (FuseOps does not fuse across a reshape)."""
        while True:
            bound = self.lookup_binding(x)
            if not (isinstance(bound, relax.Call) and isinstance(bound.op, tvm.ir.Op)
                    and bound.op.name == "relax.reshape" and isinstance(bound.args[0], relax.Var)
                    and str(getattr(bound.args[0].ty, "dtype", "")) == str(x.ty.dtype)):
                return x
            x = bound.args[0]


def compose_tables(mod: tvm.IRModule) -> tvm.IRModule:
    """Every take(table, f(x)) of an 8-bit x rewritten as one lookup of x (module doc); the index chains left
    unused are dropped."""
    return relax.transform.DeadCodeElimination()(mutate_relax_functions(_TableComposer(mod), mod))


def _table_lookup(func: tirx.PrimFunc) -> bool:
    """Whether `func` is out[i...] = table[index[i...]]: one block, a 1-D table, index and output alike."""
    sch = fresh_schedule(func)
    if not has_root(sch):
        return False
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1 or not spatial_only(sch, blocks[0]):
        return False
    store = sch.get(blocks[0]).body
    load = getattr(store, "value", None)
    if not (isinstance(store, tirx.BufferStore) and isinstance(load, TensorLoad)
            and len(load.source.shape) == 1 and len(load.indices) == 1):
        return False
    index = load.indices[0]
    return (isinstance(index, TensorLoad) and len(index.indices) == len(store.indices)
            and all(a.same_as(b) for a, b in zip(index.indices, store.indices, strict=True)))


@tvm.transform.module_pass(opt_level=0, name="MarkTableLookups")
def mark_table_lookups(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark every table lookup PrimFunc elementwise (TVM leaves a gather opaque), so FuseOps fuses it into the
    kernel that makes its index: after compose_tables, the fc1 matmul whose epilogue writes the GELU's input
    bytes. Run after AnnotateTIROpPattern, before FuseOps."""
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and _table_lookup(func):
            out[gv] = func.with_attr("op_pattern", ELEMWISE)
    return out
