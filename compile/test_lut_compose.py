"""compose_tables folds an 8-bit index chain into the table (same values on every byte), leaves what it
cannot prove alone, and mark_table_lookups lets the lookup fuse into the kernel that makes its index."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile._common import mutate_relax_functions
from plateau.compile.lut_compose import _TableComposer, compose_tables, mark_table_lookups

TABLE = np.random.default_rng(0).integers(-128, 128, 256).astype(np.int8)


def _lookup_module(dtype: str, zero_point: int, table: np.ndarray = TABLE, reshape: bool = False,
                   row_max: bool = False) -> tvm.IRModule:
    """x -> (reshape) -> widen, subtract the zero point, wrap negatives by 256 -> take(table): the exact GELU
    island's form; with row_max the index also depends on a reduction (the Softmax's), which must stay."""
    op = relax.op
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(op.reshape(x, (4, 8, 8))) if reshape else x
            i = bb.emit(op.subtract(op.astype(y, "int32"), relax.const(np.int32(zero_point))))
            if row_max:
                i = bb.emit(op.subtract(i, op.max(i, axis=[-1], keepdims=True)))
            wrapped = op.where(op.less(i, relax.const(np.int32(0))), op.add(i, relax.const(np.int32(256))), i)
            out = bb.emit_output(op.take(relax.const(table, str(table.dtype)), bb.emit(wrapped), axis=0, mode="fast"))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, "llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _every_byte(dtype: str) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.arange(info.min, info.max + 1).astype(dtype).reshape(4, 64)


@pytest.mark.parametrize("dtype, zero_point, reshape", [("int8", -128, False), ("int8", 3, True),
                                                         ("uint8", 128, False)])
def test_composed_table_gives_the_same_bytes(dtype, zero_point, reshape):
    mod = _lookup_module(dtype, zero_point, reshape=reshape)
    composer = _TableComposer(mod)
    mutate_relax_functions(composer, mod)
    assert composer.count == 1
    after = compose_tables(mod)
    script = after["main"].script()
    assert "R.where" not in script and "R.less" not in script  # the index chain is gone
    x = _every_byte(dtype)
    np.testing.assert_array_equal(_run(after, x), _run(mod, x))


def test_composed_table_keeps_its_type():
    """An int64 table with values past int32 stays int64 (relax.const alone narrows int64 arrays to int32)."""
    table = np.random.default_rng(1).integers(-2**40, 2**40, 256).astype(np.int64)
    mod = _lookup_module("uint8", 0, table=table)
    x = _every_byte("uint8")
    got = _run(compose_tables(mod), x)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _run(mod, x))


@pytest.mark.parametrize("case", ["row_max", "out_of_range"])
def test_lookup_left_alone(case):
    """An index that depends on a reduction, or that leaves the table for some byte, is not folded."""
    mod = (_lookup_module("int8", 0, row_max=True) if case == "row_max"
           else _lookup_module("int8", 0, table=TABLE[:200]))
    composer = _TableComposer(mod)
    mutate_relax_functions(composer, mod)
    assert composer.count == 0


def test_table_lookup_is_marked_elementwise():
    mod = compose_tables(_lookup_module("int8", -128))
    seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    mark_table_lookups])
    patterns = {gv.name_hint: int(f.attrs["op_pattern"]) for gv, f in seq(mod).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)}
    assert patterns["take"] == 0  # kElemWise: fuses into the kernel that makes the index
    assert all(p == 0 for p in patterns.values())  # widen and add: elementwise too
