"""Attention's matmuls of two activations on the dot instructions (dot_act_matmul.py), the fused row islands
(row_islands.py) and parallel elementwise kernels: exact against numpy / TVM's unscheduled build, the
instruction in the kernel, the fusion and the parallel loops where they are meant to be."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te

from plateau.compile.asm import instructions_per_function
from plateau.compile.cpu_pipeline import legalize_passes
from plateau.compile.cpu_schedule import MIN_PARALLEL_ELEMENTS, schedule_injective
from plateau.compile.dot_act_matmul import act_kernel, act_matmul_te, act_tile, schedule_act_dot
from plateau.compile.dot_instructions import AVX2, SDOT, SMMLA, VNNI
from plateau.compile.row_islands import ROW_VECTOR, narrow_row_max, schedule_row_island
from plateau.compile.targets import get_target
from plateau.compile.tir_helpers import fresh_schedule

HOST = get_target("host")
LIMITS = {"int8": (-128, 128), "uint8": (0, 256)}


def _kernel_func(m: int, k: int, n: int, a_dtype: str, b_dtype: str, za: int, zb: int, kernel):
    a = te.placeholder((2, 3, m, k), a_dtype, name="a")
    b = te.placeholder((2, 3, k, n), b_dtype, name="b")
    return te.create_prim_func([a, b, act_matmul_te(a, b, za, zb, kernel)])


@pytest.mark.skipif(HOST.kernel is None or HOST.kernel.pixels > 1, reason="no one-pixel dot kernel on this host")
@pytest.mark.parametrize("a_dtype,b_dtype", [("int8", "int8"), ("uint8", "int8"), ("int8", "uint8"),
                                             ("uint8", "uint8")])
@pytest.mark.parametrize("shape,zps", [((65, 64, 65), (3, -5)), ((65, 65, 64), (0, 7)), ((7, 5, 3), (-2, 0)),
                                       ((4, 16, 16), (0, 0))])
def test_act_matmul_is_exact(a_dtype, b_dtype, shape, zps):
    """Every byte-type pair, zero points zero or not, shapes with and without padding: the scheduled kernel
    (tensorized with the host's instruction) equals numpy's integer matmul of the centered operands."""
    m, k, n = shape
    za, zb = zps
    rng = np.random.default_rng(m * k + n)
    a = rng.integers(*LIMITS[a_dtype], (2, 3, m, k)).astype(a_dtype)
    b = rng.integers(*LIMITS[b_dtype], (2, 3, k, n)).astype(b_dtype)
    want = np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)
    sch = fresh_schedule(_kernel_func(m, k, n, a_dtype, b_dtype, za, zb, HOST.kernel))
    assert schedule_act_dot(sch, HOST.kernel)
    lib = tvm.compile(sch.mod, tvm.target.Target(HOST.tvm_target))
    out = tvm.runtime.tensor(np.zeros((2, 3, m, n), "int32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("target,kernel,mnemonic", [("arm64-dotprod", SDOT, "sdot"), ("arm64-i8mm", SMMLA, "sdot"),
                                                    ("x86-vnni", VNNI, "vpdpbusd"),
                                                    ("x86-avx2", AVX2, "vpmaddwd")])
def test_act_matmul_kernel_holds_the_instruction(target, kernel, mnemonic):
    """Each target's attention kernel is tensorized with its instruction (smmla's targets take sdot: its pixel
    pairs do not fit a matmul of two activations)."""
    k = act_kernel(kernel)
    sch = fresh_schedule(_kernel_func(65, 64, 65, "int8", "int8", 3, -5, k).with_attr("global_symbol", "attn"))
    assert schedule_act_dot(sch, k)
    asm = tvm.compile(sch.mod, tvm.target.Target(get_target(target).tvm_target)).mod.inspect_source("asm")
    found = instructions_per_function(asm, mnemonic)
    # the register tile unrolled: ACT_ROWS rows x oc column blocks, one instruction each
    assert sum(v for f, v in found.items() if f.startswith("attn")) >= 4 * act_tile(66, k), found


def test_row_island_schedule_keeps_the_numbers():
    """A Softmax-like island (row max, exp, row sum, divide) fused into one function: scheduled per row in
    parallel, it gives the unscheduled function's numbers bit for bit."""
    x = te.placeholder((4, 3, 65, 65), "float32", name="x")
    r1, r2 = te.reduce_axis((0, 65), "r1"), te.reduce_axis((0, 65), "r2")
    mx = te.compute((4, 3, 65, 1), lambda a, b, i, _: te.max(x[a, b, i, r1], axis=r1), name="max")
    e = te.compute(x.shape, lambda a, b, i, j: te.exp(x[a, b, i, j] - mx[a, b, i, 0]), name="exp")
    s = te.compute((4, 3, 65, 1), lambda a, b, i, _: te.sum(e[a, b, i, r2], axis=r2), name="sum")
    y = te.compute(x.shape, lambda a, b, i, j: e[a, b, i, j] / s[a, b, i, 0], name="out")
    func = te.create_prim_func([x, y])
    sch = fresh_schedule(func)
    assert schedule_row_island(sch)
    assert "T.parallel" in sch.mod["main"].script()
    data = np.random.default_rng(0).standard_normal((4, 3, 65, 65)).astype("float32")
    outs = []
    for mod in (tvm.IRModule({"main": func}), sch.mod):
        o = tvm.runtime.tensor(np.zeros_like(data))
        tvm.compile(mod, tvm.target.Target(HOST.tvm_target))["main"](tvm.runtime.tensor(data), o)
        outs.append(o.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("n", [64, 65])
def test_row_island_divides_in_packed_vectors_with_or_without_a_tail(n):
    """Row loops run in vectorized chunks; a row that does not divide into them (65 tokens) keeps its whole chunks
    vectorized and only the tail scalar (a guarded single loop would run every element scalar)."""
    x = te.placeholder((2, n, n), "float32", name="x")
    r = te.reduce_axis((0, n), "r")
    s = te.compute((2, n, 1), lambda a, i, _: te.sum(x[a, i, r], axis=r), name="sum")
    y = te.compute(x.shape, lambda a, i, j: x[a, i, j] / s[a, i, 0], name="out")
    sch = fresh_schedule(te.create_prim_func([x, y]))
    assert schedule_row_island(sch)
    t = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver2"})
    asm = tvm.compile(sch.mod, t).mod.inspect_source("asm")
    packed, scalar = asm.count("vdivps"), asm.count("vdivss")
    assert packed >= 1 and scalar == (1 if n % ROW_VECTOR else 0), (packed, scalar)


def _softmax_module() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 3, 65, 65), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mx = bb.emit(relax.op.max(x, axis=[3], keepdims=True))
            e = bb.emit(relax.op.exp(relax.op.subtract(x, mx)))
            s = bb.emit(relax.op.sum(e, axis=[3], keepdims=True))
            y = bb.emit_output(relax.op.divide(e, s))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("row_islands", [True, False])
def test_row_reductions_fuse_into_one_island(row_islands):
    """With row_islands the max, the exp, the sum and the division of a Softmax become one PrimFunc (its
    reductions marked injective before FuseOps); without it TVM splits the island at each reduction."""
    t = tvm.target.Target(HOST.tvm_target)
    with t:
        mod = tvm.transform.Sequential(legalize_passes(t, row_islands=row_islands))(_softmax_module())
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert (len(funcs) == 1) == row_islands, [gv.name_hint for gv in mod.get_global_vars()]


@pytest.mark.parametrize("elements,parallel", [(MIN_PARALLEL_ELEMENTS, True), (MIN_PARALLEL_ELEMENTS // 2, False)])
def test_elementwise_kernels_run_in_parallel_from_the_threshold(elements, parallel):
    """A spatial kernel with MIN_PARALLEL_ELEMENTS per image runs its outer loops in parallel; a smaller one stays
    serial (a thread-pool barrier would cost more than the copy)."""
    n = tvm.tirx.Var("n", "int64")
    x = te.placeholder((n, elements // 64, 64), "int8", name="x")
    y = te.compute(x.shape, lambda *i: x(*i) + tvm.tirx.const(1, "int8"), name="y")
    sch = fresh_schedule(te.create_prim_func([x, y]))
    assert schedule_injective(sch)
    assert ("T.parallel" in sch.mod["main"].script()) == parallel


def test_row_max_taken_on_the_bytes():
    """max(astype(x8, int64)) -> astype(max(x8), int64): same integers, and the island reads the 8-bit scores."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 5, 7), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wide = bb.emit(relax.op.astype(x, "int64"))
            mx = bb.emit(relax.op.max(wide, axis=[3], keepdims=True))
            y = bb.emit_output(relax.op.subtract(wide, mx))
        bb.emit_func_output(y)
    before = bb.get()
    after = narrow_row_max(before)
    assert 'R.max(x, axis=[3], keepdims=True)' in after["main"].script()
    v = np.random.default_rng(0).integers(-128, 128, (2, 3, 5, 7)).astype(np.int8)
    outs = []
    for mod in (before, after):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(v)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
