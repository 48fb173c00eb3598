"""4-bit weights stored two per byte in the library: exact round trip, only 4-bit-valued weights packed."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from plateau.compile.cpu_pipeline import build_pipeline
from plateau.compile.pack_int4 import pack_int4_weights, packed_weight_bytes, unpacked_value


def _matmul_module(w: np.ndarray) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, w.shape[0]), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w, "int8"), out_dtype="int32"))
        bb.emit_func_output(out)
    return bb.get()


# an odd count (63 values: a half-filled last byte) and an even one
@pytest.mark.parametrize("shape", [(9, 7), (16, 4)])
def test_pack_round_trip_is_exact(shape):
    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, shape).astype(np.int8)
    w.reshape(-1)[:16] = np.arange(-8, 8)  # every 4-bit value, both nibble positions
    mod = _matmul_module(w)
    packed = pack_int4_weights(mod)
    assert packed_weight_bytes(mod) == (w.size, 0)
    assert packed_weight_bytes(packed) == ((w.size + 1) // 2, 1)
    t = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(tvm.compile(packed, t, relax_pipeline=build_pipeline(t)), tvm.cpu())
    x = np.eye(2, shape[0], dtype=np.int8)  # rows 0 and 1 of w
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), w[:2].astype(np.int32))


def test_eight_bit_weights_are_not_packed():
    w = np.random.default_rng(2).integers(-127, 128, (16, 8)).astype(np.int8)
    w[0, 0] = 100
    assert packed_weight_bytes(pack_int4_weights(_matmul_module(w))) == (w.size, 0)


@pytest.mark.parametrize("shape", [(9, 7), (16, 4)])
def test_unpacked_value_reads_the_weight_back_at_compile_time(shape):
    """What the dot-kernel rewrite relies on to re-pack 4-bit weights in its own order."""
    w = np.random.default_rng(3).integers(-8, 8, shape).astype(np.int8)
    packed = relax.transform.Normalize()(pack_int4_weights(_matmul_module(w)))
    bindings = {b.var: b.value for blk in packed["main"].body.blocks for b in blk.bindings}
    (mm,) = [v for v in bindings.values() if getattr(getattr(v, "op", None), "name", "") == "relax.matmul"]
    np.testing.assert_array_equal(unpacked_value(mm.args[1], bindings.get), w)
    assert unpacked_value(relax.const(w), bindings.get) is None
