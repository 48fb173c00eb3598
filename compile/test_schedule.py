"""The dot kernels (dot_rewrite.py, dot_schedule.py), the hand schedules (cpu_schedule.py) and tile tuning
(tune.py): exact, and used where they apply; the kernel each target gets (CompileTarget.kernel)."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tvm
from support import compile_models as fx
from tvm import relax, te, tirx
from tvm.s_tir import Schedule

from plateau.compile import compile_onnx, get_target
from plateau.compile.compiler import build, import_onnx, lower_for_target
from plateau.compile.cpu_features import has_avx2, kernel_for_target
from plateau.compile.cpu_pipeline import legalize_passes
from plateau.compile.cpu_schedule import schedule_primfuncs
from plateau.compile.dot_compute import DOT_INPUT, DW_BLOCK, conv_te, pack_weight, token_rows
from plateau.compile.dot_instructions import AVX2, AVX2_S4, SDOT, SMMLA, VNNI
from plateau.compile.dot_rewrite import rewrite_convs_dot
from plateau.compile.dot_schedule import ConvTile, find_conv_block, schedule_dot_conv, schedule_dw_conv
from plateau.compile.lower import lower_qdq
from plateau.compile.tir_helpers import fresh_schedule, inline_safe
from plateau.compile.tune import DB_FILE, load_db, tuned_tiles
from plateau.errors import PlateauError

HOST = tvm.target.Target(get_target("host").tvm_target)
needs_vnni = pytest.mark.skipif(get_target("host").kernel is not VNNI, reason="host CPU has no AVX-512 VNNI")


def _resnet_block_onnx(path: Path) -> Path:
    """conv(3->16) -> [conv(16->16) relu conv(16->16)] + skip -> stride-2 conv(16->32) -> pool -> fc:
    16-channel multiples, so the VNNI kernel applies (the shared tiny fixtures have 8 channels)."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), \
                nn.Conv2d(16, 16, 3, padding=1)
            self.c3, self.fc = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.c0(x))
            x = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
            return self.fc(torch.relu(self.c3(x)).mean((2, 3)))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), torch.randn(1, 3, fx.HW, fx.HW), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}}, opset_version=17,
                      dynamo=False)
    return path


@pytest.fixture(scope="module")
def block_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sched_models")
    fp32 = _resnet_block_onnx(d / "fp32.onnx")
    return {"s8s8": fx.ort_qdq(fp32, d / "s8s8.onnx", "s8", "s8"),
            "u8s8": fx.ort_qdq(fp32, d / "u8s8.onnx", "u8", "s8"),
            # 4-bit weights: stored two per byte, unpacked inside the dot kernel
            "w4": fx.ort_qdq(fp32, d / "w4.onnx", "s8", "s4")}


def _run(so: Path, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@needs_vnni
@pytest.mark.parametrize("name", ["s8s8", "u8s8", "w4"])
def test_scheduled_build_is_bit_exact(block_models, tmp_path, name):
    """The scheduled library gives the same logits as TVM's unscheduled kernels, at batch 1 and 5."""
    onnx_path = block_models[name]
    m = compile_onnx(onnx_path, "host", tmp_path / "sched")
    compile_onnx(onnx_path, "host", tmp_path / "plain", schedule="none")
    assert m["conv_layout"] == "NHWC" and m["config"]["schedule"] == "default"
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, fx.HW, fx.HW)).astype(np.float32)
        np.testing.assert_array_equal(_run(tmp_path / "sched" / "model.so", x),
                                      _run(tmp_path / "plain" / "model.so", x))


@pytest.mark.parametrize("target", ["host", "arm64-dotprod", "arm64-i8mm"])
def test_zero_point_pads_run_inside_the_conv_kernels(block_models, target):
    """The Pad before each conv (and ConvertLayout's transposes around it) becomes the dot kernel's input
    stage: no pad op is left in the graph, and every fused conv kernel holds its input stage."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tgt = tvm.target.Target(get_target(target).tvm_target)
    kernel = get_target(target).kernel
    if kernel is None:
        pytest.skip(f"no dot kernel for {target} here")
    mod, _ = import_onnx(block_models["s8s8"])
    mod = lower_for_target(lower_qdq(mod), get_target(target))
    assert "R.nn.pad" in mod["main"].script()
    with tgt:
        mod, n = rewrite_convs_dot(mod, kernel)
        assert n == 4 and "R.nn.pad" not in mod["main"].script()
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tgt) + legalize_passes(tgt))(mod)
    prefix = f"fused_plateau_conv2d_{kernel.name}"
    convs = [f for gv, f in mod.functions_items() if gv.name_hint.startswith(prefix)]
    assert len(convs) == 4 and all(DOT_INPUT in f.script() for f in convs)
    assert not [gv for gv in mod.get_global_vars() if "pad" in gv.name_hint]


@needs_vnni
@pytest.mark.parametrize("name", ["s8s8", "w4"])
def test_every_conv_gets_the_vnni_kernel(block_models, name):
    """Also the 4-bit weights: read back from their packed constants, re-packed two per byte in the kernel's
    order, no unpack kernel of their own left."""
    mod, _ = import_onnx(block_models[name])
    mod = lower_for_target(lower_qdq(mod), get_target("host"))
    out, n = rewrite_convs_dot(mod, VNNI)
    assert n == 4
    if name == "w4":
        assert mod["main"].script().count("R.bitwise_and") >= 4  # packed by pack_int4
        assert out["main"].script().count("R.bitwise_and") == mod["main"].script().count("R.bitwise_and") - 4


@needs_vnni
@pytest.mark.parametrize("stride,tile", [(1, ConvTile(4, 1)), (2, ConvTile(2, 2)), (1, None),
                                         (1, ConvTile(8, 1, kw_inner=True)),
                                         (2, ConvTile(4, 2, kw_inner=True))])
def test_vnni_conv_kernel_exact(stride, tile):
    """The tensorized kernel alone against numpy: u8 x s8 -> s32, packed weights."""
    n, h, w, c, o, k = 2, 10, 10, 16, 32, 3
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, h, w, c)).astype(np.uint8)
    wt = rng.integers(-128, 128, (o, k, k, c)).astype(np.int8)
    wp, _ = pack_weight(wt, 16)
    data, wpt = te.placeholder(x.shape, "uint8"), te.placeholder(wp.shape, "int8")
    out = conv_te(data, wpt, stride, stride)
    sch = Schedule(te.create_prim_func([data, wpt, out]).with_attr("global_symbol", "main"))
    sch = schedule_dot_conv(sch, sch.get_sblock(out.op.name), tile, VNNI)
    lib = tvm.compile(sch.mod, HOST)
    oh = (h - k) // stride + 1
    res = tvm.runtime.tensor(np.zeros((n, oh, oh, o), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), res)
    ref = np.zeros((n, oh, oh, o), np.int64)
    for a in range(k):
        for b in range(k):
            patch = x[:, a:a + stride * oh:stride, b:b + stride * oh:stride].astype(np.int64)
            ref += np.einsum("nhwc,oc->nhwo", patch, wt[:, a, b].astype(np.int64))
    np.testing.assert_array_equal(res.numpy(), ref)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


def _host_has_avx2() -> bool:
    try:
        return any(" avx2" in ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except OSError:
        return False


needs_avx2 = pytest.mark.skipif(not _host_has_avx2(), reason="this CPU has no AVX2 to run an x86-avx2 build")


def test_x86_targets_pick_their_kernel():
    """x86-avx2 (Haswell) takes the vpmaddwd kernel, x86-vnni (Cascade Lake) vpdpbusd; not for aarch64 /
    GPU."""
    kernel = {t: get_target(t).kernel for t in ("x86-avx2", "x86-vnni", "cuda", "opencl")}
    assert kernel == {"x86-avx2": AVX2, "x86-vnni": VNNI, "cuda": None, "opencl": None}
    assert has_avx2(tvm.target.Target({"kind": "llvm", "mattr": ["+avx2"]}))
    assert not has_avx2(tvm.target.Target(get_target("arm64").tvm_target))
    assert not has_avx2(tvm.target.Target({"kind": "llvm", "mcpu": "core2"}))


@needs_avx2
@pytest.mark.parametrize("name", ["s8s8", "u8s8", "w4"])
def test_avx2_kernel_is_exact(block_models, tmp_path, name, caplog):
    """x86-avx2: every conv is the tensorized vpmaddwd kernel (int16 pairs, exact: vpmaddubsw's int16 sums
    would saturate), int8 and uint8 activations and 4-bit weights alike; run on this CPU, the library equals
    TVM's unscheduled host build on every logit."""
    from plateau.compile.asm import instructions_per_function

    tgt = get_target("x86-avx2")
    mod, _ = import_onnx(block_models[name])
    _, n = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), AVX2)
    assert n == 4
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    counts = instructions_per_function(ex.mod.imports[0].inspect_source("asm"), "vpmaddwd")
    convs = {f: c for f, c in counts.items() if f.startswith("fused_plateau_conv2d_avx2")}
    assert len(convs) == 4 and all(c > 0 for c in convs.values()), counts
    _assert_scheduled_build_exact(block_models[name], "x86-avx2", tmp_path, caplog, seed=4)


@needs_avx2
@pytest.mark.parametrize("values", ["random", "lowest", "highest"])
def test_avx2_small_weights_kernel_exact_at_the_int16_limit(values):
    """AVX2_S4 alone against numpy, u8 x s4 -> s32: at its bound (activations 255, weights all -8 or all 7:
    every int16 sum of its vpmaddubsw results at +-32640 or 28560) and on random bytes; exact, no saturation."""
    n, h, w, c, o = 1, 2, 8, 64, 16
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, h, w, c)).astype(np.uint8)
    wt = rng.integers(-8, 8, (o, 1, 1, c)).astype(np.int8)
    if values != "random":
        x[:] = 255
        wt[:] = -8 if values == "lowest" else 7
    wp, _ = pack_weight(wt, AVX2_S4.lanes, AVX2_S4.k, AVX2_S4.groups)
    data, wpt = te.placeholder(x.shape, "uint8"), te.placeholder(wp.shape, "int8")
    out = conv_te(data, wpt, 1, 1)
    sch = Schedule(te.create_prim_func([data, wpt, out]).with_attr("global_symbol", "main"))
    sch = schedule_dot_conv(sch, sch.get_sblock(out.op.name), None, AVX2_S4)
    lib = tvm.compile(sch.mod, tvm.target.Target(get_target("x86-avx2").tvm_target))
    res = tvm.runtime.tensor(np.zeros((n, h, w, o), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), res)
    ref = np.einsum("nhwc,oc->nhwo", x.astype(np.int64), wt[:, 0, 0].astype(np.int64))
    np.testing.assert_array_equal(res.numpy(), ref)
    assert "vpmaddubsw" in lib.mod.inspect_source("asm")


@needs_avx2
def test_avx2_four_bit_linear_layers_take_vpmaddubsw(tmp_path, caplog):
    """x86-avx2, 4-bit weights: the Linear layers whose inputs are a multiple of 32 wide run AVX2_S4
    (vpmaddubsw, int16 sums of 8, one vpmaddwd to widen); the 3-channel patch embedding keeps vpmaddwd; the
    library equals TVM's unscheduled build on every logit."""
    from plateau.compile.asm import instructions_per_function

    onnx_path = fx.ort_qdq(_token_mlp_onnx(tmp_path / "fp32.onnx"), tmp_path / "mlp.onnx", "s8", "s4")
    tgt = get_target("x86-avx2")
    mod, _ = import_onnx(onnx_path)
    with tvm.target.Target(tgt.tvm_target):
        out, _ = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), tgt.kernel)
    text = out["main"].script()
    assert text.count("plateau_matmul_avx2s4") == 3  # fc1, fc2, head
    assert "plateau_conv2d_avx2" in text and "plateau_conv2d_avx2s4" not in text  # 3 input channels
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    counts = instructions_per_function(ex.mod.imports[0].inspect_source("asm"), "vpmaddubsw")
    s4 = {f: c for f, c in counts.items() if f.startswith("fused_plateau_matmul_avx2s4")}
    assert len(s4) == 3 and all(c >= AVX2_S4.groups for c in s4.values()), counts
    _assert_scheduled_build_exact(onnx_path, "x86-avx2", tmp_path, caplog, seed=6)


def test_arm_targets_pick_the_sdot_kernel():
    kernel = {t: get_target(t).kernel for t in ("arm64", "arm64-dotprod", "arm64-i8mm", "rpi5",
                                                "arm64-neon", "rpi4")}
    assert kernel == {"arm64": SDOT, "arm64-dotprod": SDOT, "arm64-i8mm": SMMLA, "rpi5": SDOT,
                      "arm64-neon": None, "rpi4": None}


@pytest.mark.parametrize("target",
                         ["x86-avx2", "x86-vnni", "arm64", "arm64-neon", "arm64-dotprod", "arm64-i8mm",
                                    "rpi4", "rpi5", "cuda", "opencl", "host"])
def test_target_kernels_agree_with_cpu_features(target):
    """Each named target's fixed kernel is the one its CPU name and features imply (the host's is probed)."""
    tgt = get_target(target)
    assert tgt.kernel == kernel_for_target(tgt.tvm_target)


@pytest.mark.parametrize("target,name", [("arm64-dotprod", "s8s8"), ("arm64-dotprod", "u8s8"),
                                         ("arm64-dotprod", "w4"), ("arm64-i8mm", "s8s8"),
                                         ("arm64-i8mm", "u8s8"),
                                         ("arm64-i8mm", "w4")])
def test_arm_kernels_bit_exact_under_qemu(block_models, tmp_path, target, name):
    """arm64-dotprod / arm64-i8mm: every conv (stride 1 and 2) becomes the tensorized sdot / smmla kernel
    (uint8 activations shifted to int8), the instruction is in every conv kernel, and the library run under
    qemu-aarch64 equals TVM's unscheduled host build on every logit."""
    from plateau import runtime
    from plateau.compile.asm import instructions_per_function

    tgt = get_target(target)
    kernel = tgt.kernel
    mod, _ = import_onnx(block_models[name])
    _, n = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), kernel)
    assert n == 4
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    counts = instructions_per_function(ex.mod.imports[0].inspect_source("asm"), kernel.name)
    convs = [f for f in counts if f.startswith(f"fused_plateau_conv2d_{kernel.name}")]
    assert len(convs) == 4, counts
    m = compile_onnx(block_models[name], target, tmp_path / "arm")
    assert m["conv_layout"] == "NHWC"
    if runtime.sysroot_status() is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("arm64 sysroot / qemu not set up (make arm64-sysroot)")
    compile_onnx(block_models[name], "host", tmp_path / "plain", schedule="none")
    x = np.random.default_rng(2).standard_normal((5, 3, fx.HW, fx.HW)).astype(np.float32)
    got = runtime.run_artifact(tmp_path / "arm", x, device="qemu").outputs
    np.testing.assert_array_equal(got, _run(tmp_path / "plain" / "model.so", x))


def _assert_scheduled_build_exact(onnx_path: Path, target: str, tmp_path: Path, caplog, seed: int) -> None:
    """Build `onnx_path` for `target` with no kernel left unscheduled, run it (arm64: under qemu) and compare
    it with TVM's unscheduled host build on every logit."""
    from plateau import runtime

    with caplog.at_level("WARNING", logger="plateau.compile.cpu_schedule"):
        compile_onnx(onnx_path, target, tmp_path / "sched")
    assert "left unscheduled" not in caplog.text
    compile_onnx(onnx_path, "host", tmp_path / "plain", schedule="none")
    x = np.random.default_rng(seed).standard_normal((3, 3, fx.HW, fx.HW)).astype(np.float32)
    if get_target(target).arch == "host":  # this machine's CPU runs it (x86-avx2 too: needs_avx2)
        got = _run(tmp_path / "sched" / "model.so", x)
    elif runtime.sysroot_status() is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("arm64 sysroot / qemu not set up (make arm64-sysroot)")
    else:
        got = runtime.run_artifact(tmp_path / "sched", x, device="qemu").outputs
    np.testing.assert_array_equal(got, _run(tmp_path / "plain" / "model.so", x))


def _rewritten_and_legalized(onnx_path: Path, target: str) -> tuple[tvm.IRModule, int]:
    """`onnx_path` lowered for `target`, its convs rewritten to the target's dot kernel (and how many), then
    legalized by the CPU pipeline: the PrimFuncs schedule_primfuncs receives."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tgt = get_target(target)
    t = tvm.target.Target(tgt.tvm_target)
    mod, _ = import_onnx(onnx_path)
    with t:
        mod, n = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), tgt.kernel)
        return tvm.transform.Sequential(cpu.library_dispatch_passes(t) + legalize_passes(t))(mod), n


@pytest.mark.parametrize("target,weights", [("host", "s8"), ("arm64-dotprod", "s8"), ("host", "s4")])
def test_depthwise_conv_kernel_is_exact(tmp_path, target, weights, caplog):
    """MobileNet-style block (stem, depthwise 3x3 + ReLU6, pointwise): the depthwise conv becomes its own
    kernel (input stage, unrolled taps, channels vectorized), scheduled, and the library equals TVM's
    unscheduled host build on every logit (arm64: under qemu)."""
    onnx_path = fx.ort_qdq(fx.tiny_mobile_onnx(tmp_path / "fp32.onnx"), tmp_path / "mobile.onnx",
                           "s8", weights)
    kernel = get_target(target).kernel
    if kernel is None:
        pytest.skip(f"no dot kernel for {target} here")
    mod, n = _rewritten_and_legalized(onnx_path, target)
    # the depthwise conv, the stem, and the 16 -> 24 pointwise (with VNNI the 8-lane kernel: 3 x 8)
    assert n == 3
    if target == "host":  # a VNNI host takes the 256-bit kernel for 24 channels; an AVX2 host its one kernel
        assert f"plateau_conv2d_{'vnniy' if kernel is VNNI else kernel.name}" in str(mod.get_global_vars())
    (dw,) = [f for gv, f in mod.functions_items() if "plateau_dwconv2d" in gv.name_hint]
    sch = fresh_schedule(dw)
    assert "T.vectorized" in schedule_dw_conv(sch, find_conv_block(sch, DW_BLOCK)).mod.script()
    _assert_scheduled_build_exact(onnx_path, target, tmp_path, caplog, seed=4)


def test_depthwise_fallback_runs_outer_loops_in_parallel(tmp_path, monkeypatch, caplog):
    """A depthwise conv whose shape the tiled schedule refuses is not left unscheduled: its outer loops run in
    parallel, and the library still equals TVM's unscheduled build on every logit."""
    import plateau.compile.cpu_schedule as S

    refused = []

    def refuse(sch, block):
        refused.append(block)
        raise ValueError("this shape is not tiled")

    monkeypatch.setattr(S, "schedule_dw_conv", refuse)
    monkeypatch.setattr(S, "MIN_PARALLEL_WORK", 1)  # the tiny model's 8x8 depthwise would stay serial
    onnx_path = fx.ort_qdq(fx.tiny_mobile_onnx(tmp_path / "fp32.onnx"), tmp_path / "mobile.onnx", "s8", "s8")
    mod, _ = _rewritten_and_legalized(onnx_path, "host")
    t = tvm.target.Target(get_target("host").tvm_target)
    with t:
        scheduled = S.schedule_primfuncs(mod, None, get_target("host").kernel)
    (name,) = [gv.name_hint for gv in mod.get_global_vars() if "plateau_dwconv2d" in gv.name_hint]
    assert refused and "T.parallel" in scheduled[name].script()
    assert scheduled[name].script() != mod[name].script()
    _assert_scheduled_build_exact(onnx_path, "host", tmp_path, caplog, seed=6)


def _token_mlp_onnx(path: Path, stride: int = 4) -> Path:
    """Patchify conv -> tokens [N, 16, 32] -> Linear(32, 64) + ReLU -> Linear(64, 32) -> token mean ->
    Linear(32, 10): matmuls on 3-D token tensors and on a 2-D one. `stride` 3: overlapping patches, 25
    tokens."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch, self.fc1, self.fc2 = nn.Conv2d(3, 32, 4, stride), nn.Linear(32, 64), nn.Linear(64, 32)
            self.head = nn.Linear(32, 16)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = self.fc2(torch.relu(self.fc1(t)))
            return self.head(t.mean(1))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), torch.randn(1, 3, fx.HW, fx.HW), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}}, opset_version=17,
                          dynamo=False)
    return path


@pytest.mark.parametrize("target", ["host", "arm64-dotprod"])
def test_linear_layers_get_the_dot_kernel(tmp_path, target, caplog):
    """Matmuls with a constant weight (Linear on tokens [N, T, K] and on [N, K]) run the dot kernel over token
    rows, scheduled, bit-exact against TVM's unscheduled host build (arm64: under qemu)."""
    onnx_path = fx.ort_qdq(_token_mlp_onnx(tmp_path / "fp32.onnx"), tmp_path / "mlp.onnx")
    tgt = get_target(target)
    t = tvm.target.Target(tgt.tvm_target)
    if tgt.kernel is None:
        pytest.skip(f"no dot kernel for {target} here")
    mod, _ = import_onnx(onnx_path)
    with t:
        out, _ = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), tgt.kernel)
    assert out["main"].script().count("plateau_matmul_") == 3  # fc1, fc2 and the 16-wide head
    _assert_scheduled_build_exact(onnx_path, target, tmp_path, caplog, seed=5)


def test_four_bit_linear_runs_weight_stationary_up_to_a_few_rows(tmp_path, monkeypatch):
    """4-bit Linear layers: one kernel holding both schedules, chosen by the token rows at run time
    (weight-stationary for a few row tiles, row-major above); both bit-exact with TVM's unscheduled build."""
    from plateau.compile import dot_schedule

    monkeypatch.setattr(dot_schedule, "WEIGHT_STATIONARY_TILES", 4)  # 16 tokens per image: batch 2 -> 4 tiles
    onnx_path = fx.ort_qdq(_token_mlp_onnx(tmp_path / "fp32.onnx"), tmp_path / "mlp.onnx", "s8", "s4")
    tgt = get_target("host")
    if tgt.kernel is None:
        pytest.skip("no dot kernel on this CPU")
    mod, _ = _rewritten_and_legalized(onnx_path, "host")
    with tvm.target.Target(tgt.tvm_target):
        scheduled = schedule_primfuncs(mod, None, tgt.kernel)
    four_bit = [f.script() for gv, f in scheduled.functions_items()
                if "plateau_matmul_" in gv.name_hint and "plateau_dot_weight" in f.script()]
    assert four_bit and all('T.sblock("weight_stationary")' in s and 'T.sblock("row_major")' in s
                            for s in four_bit)
    compile_onnx(onnx_path, "host", tmp_path / "sched")
    compile_onnx(onnx_path, "host", tmp_path / "plain", schedule="none")
    for batch in (1, 2, 9):  # 2, 4 and 18 row tiles of 8 tokens
        x = np.random.default_rng(batch).standard_normal((batch, 3, fx.HW, fx.HW)).astype(np.float32)
        np.testing.assert_array_equal(_run(tmp_path / "sched" / "model.so", x),
                                      _run(tmp_path / "plain" / "model.so", x))


def _two_blocks(consumer) -> Schedule:
    a = te.placeholder((8,), "float32")
    m = te.compute((8,), lambda i: a[i] * tirx.const(0.5, "float32"), name="mul")
    out = te.compute((8,), lambda i: consumer(m[i], a[i]), name="out")
    return Schedule(te.create_prim_func([a, out]))


def test_inline_safe_refuses_multiply_into_add():
    """A float product inlined into an add could become an FMA (fp-contract=fast): not inlined."""
    sch = _two_blocks(lambda m, a: m + a)
    assert not inline_safe(sch, sch.get_sblock("mul"))
    sch = _two_blocks(lambda m, a: tirx.nearbyint(m))
    assert inline_safe(sch, sch.get_sblock("mul"))


@needs_vnni
def test_tuning_database_written_then_reused(block_models, tmp_path):
    mod, _ = import_onnx(block_models["s8s8"])
    mod = lower_for_target(lower_qdq(mod), get_target("host"))
    choose, info = tuned_tiles(mod, get_target("host"), tmp_path, minutes=0.05)  # a few candidates at most
    assert choose is not None and info["entries"] >= 1
    db = load_db(tmp_path / DB_FILE)
    (entries,) = db["targets"].values()
    assert all({"ow", "oc", "ms"} <= set(e) for e in entries.values())
    choose2, info2 = tuned_tiles(mod, get_target("host"), tmp_path)  # no budget: read only
    assert info2["search_seconds"] == 0 and info2["entries"] == info["entries"]
    ex, _ = build(mod, get_target("host"), tiles=choose2)
    assert ex is not None


def test_tuning_an_arm_target_needs_the_board(block_models, tmp_path):
    mod, _ = import_onnx(block_models["s8s8"])
    mod = lower_for_target(lower_qdq(mod), get_target("arm64-dotprod"))
    with pytest.raises(PlateauError, match="needs the board: pass --rpc"):
        tuned_tiles(mod, get_target("arm64-dotprod"), tmp_path, minutes=0.05)
    assert tuned_tiles(mod, get_target("arm64-dotprod"), tmp_path) == (None,
                                                                       None)  # no database: default tiles


@pytest.mark.slow
def test_tuning_over_rpc_on_an_emulated_board(block_models, tmp_path):
    """Candidates cross-compiled, uploaded to `plateau device serve --emulate` (qemu-aarch64) and timed there;
    the database is written for the arm64 target and a later build reads it. (Emulated timings tune nothing
    real: the test checks the path a real board takes.)"""
    from plateau import runtime

    if runtime.sysroot_status() is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("arm64 sysroot / qemu not set up (make arm64-sysroot)")
    mod, _ = import_onnx(block_models["s8s8"])
    tgt = get_target("arm64-dotprod")
    mod = lower_for_target(lower_qdq(mod), tgt)
    with runtime.serve(port=0, key="tune-test", emulate=True, block=False, silent=True) as s:
        choose, info = tuned_tiles(mod, tgt, tmp_path, minutes=0.1, rpc=f"127.0.0.1:{s.port}",
                                   rpc_key="tune-test")
    assert choose is not None and info["entries"] >= 1 and "emulated" in info["timed_on"], info
    (entries,) = load_db(tmp_path / DB_FILE)["targets"].values()
    assert all(e["ms"] > 0 and e["ow"] >= 1 and e["oc"] >= 1 for e in entries.values())
    ex, _ = build(mod, tgt, tiles=tuned_tiles(mod, tgt, tmp_path)[0])
    assert "sdot" in ex.mod.imports[0].inspect_source("asm")


def test_unknown_schedule_is_an_error():
    mod = tvm.IRModule()
    with pytest.raises(PlateauError, match="unknown schedule 'fast'"):
        build(mod, get_target("host"), schedule="fast")


@pytest.mark.parametrize("weights", ["s8", "s4"])
@pytest.mark.parametrize("ow", [2, 4])
def test_linear_row_tiles_narrower_than_the_token_rows_are_exact(tmp_path, caplog, weights, ow):
    """The tuner may give a matmul a tile of fewer pixels than matmul_te's token rows (ConvTile(4, 1) fits the
    AVX2_S4 budget): the row-major schedule (batch 9: 18 row tiles; batch 1 too for int8 weights) and the 4-bit
    weight-stationary one (batch 1) alike must stay bit-exact with TVM's unscheduled build."""
    onnx_path = fx.ort_qdq(_token_mlp_onnx(tmp_path / "fp32.onnx"), tmp_path / "mlp.onnx", "s8", weights)
    tgt = get_target("host")
    if tgt.kernel is None:
        pytest.skip("no dot kernel on this CPU")
    mod, _ = import_onnx(onnx_path)
    mod = lower_for_target(lower_qdq(mod), tgt)
    with caplog.at_level("WARNING", logger="plateau.compile.cpu_schedule"):
        narrow, _ = build(mod, tgt, tiles=lambda name, sch: ConvTile(ow, 1) if "plateau_matmul_" in name else None)
    assert "left unscheduled" not in caplog.text
    plain, _ = build(mod, tgt, schedule="none")
    for batch in (1, 9):
        x = np.random.default_rng(batch).standard_normal((batch, 3, fx.HW, fx.HW)).astype(np.float32)
        got = [relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy() for ex in (narrow, plain)]
        np.testing.assert_array_equal(*got)


def test_token_rows_pad_the_static_rows_least():
    """A ViT's 65 tokens take 5-row tiles (8 would compute 72 rows at batch 1), with or without a symbolic
    batch; 8 stays where another count pads less than 5% fewer rows (197 tokens: 200 rows against 198)."""
    n = tirx.Var("n", "int64")
    assert token_rows([1, 65]) == token_rows([n, 65]) == 5
    assert token_rows([n, 197]) == 8 and token_rows([n, 16]) == 8 and token_rows([n, 7]) == 7
    assert token_rows([n, 17]) == 6 and token_rows([n, 50]) == 5
    assert token_rows([n]) == token_rows([1]) == 8  # a head over the batch alone


@pytest.mark.parametrize("target,weights", [("host", "s8"), ("host", "s4"), ("arm64-dotprod", "s8"),
                                            ("arm64-i8mm", "s8")])
def test_linear_on_token_rows_that_8_does_not_divide_is_exact(tmp_path, caplog, target, weights):
    """25 tokens: 5-row register tiles, the 4-bit weight-stationary schedule at batch 3 included; bit-exact
    with TVM's unscheduled host build (arm64: under qemu; i8mm's Linear layers on sdot)."""
    onnx_path = fx.ort_qdq(_token_mlp_onnx(tmp_path / "fp32.onnx", stride=3), tmp_path / "mlp.onnx", "s8",
                           weights)
    tgt = get_target(target)
    if tgt.kernel is None:
        pytest.skip(f"no dot kernel for {target} here")
    mod, _ = import_onnx(onnx_path)
    with tvm.target.Target(tgt.tvm_target):
        out, _ = rewrite_convs_dot(lower_for_target(lower_qdq(mod), tgt), tgt.kernel)
    rows = {int(r) for gv, f in out.functions_items() if gv.name_hint.startswith("plateau_matmul")
            for r in re.findall(r"plateau_dot_conv = T\.sblock_alloc_buffer\(\(.*?, T\.int64\((\d+)\), "
                                r"T\.int64\(\d+\)\), \"int32\"\)", f.script())}
    assert rows == {5, 8}, rows  # 8: the head, over the batch alone
    _assert_scheduled_build_exact(onnx_path, target, tmp_path, caplog, seed=7)
