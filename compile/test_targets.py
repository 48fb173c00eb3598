"""The target registry, arm64 cross-compilation (ELF machine, dot-product instructions) and a build per
target."""

from __future__ import annotations

import platform
import re
import shutil

import pytest

from plateau.compile import compile_onnx, get_target, list_targets, lower_qdq
from plateau.compile.compiler import build, import_onnx, lower_for_target
from plateau.compile.onnx_prep import output_step
from plateau.errors import PlateauError

EM_AARCH64, EM_X86_64 = 183, 62
needs_cross = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)",
)


def elf_machine(path) -> int:
    """e_machine from the ELF header (bytes 18-19, little endian), without the `file` tool."""
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(head[18:20], "little")


def test_registry_names():
    assert set(list_targets()) >= {"host", "arm64", "arm64-neon", "arm64-dotprod", "arm64-i8mm",
                                   "rpi4", "rpi5"}
    arm = get_target("arm64").tvm_target
    assert arm["mtriple"] == "aarch64-linux-gnu" and arm["mattr"] == ["+neon", "+dotprod"]
    assert "+dotprod" not in get_target("arm64-neon").tvm_target["mattr"]
    assert "+i8mm" in get_target("arm64-i8mm").tvm_target["mattr"]
    assert get_target("rpi4").tvm_target["mcpu"] == "cortex-a72"
    assert "+dotprod" not in get_target("rpi4").tvm_target["mattr"]
    assert get_target("rpi5").tvm_target["mcpu"] == "cortex-a76"


def test_unknown_target_lists_valid_names(qdq_models, tmp_path):
    with pytest.raises(PlateauError, match=r"unknown target 'arm65'.*arm64.*host"):
        compile_onnx(qdq_models["ort_s8s8"], "arm65", tmp_path)


def test_host_library_is_native(qdq_models, tmp_path):
    compile_onnx(qdq_models["ort_s8s8"], "host", tmp_path)
    if platform.machine() == "x86_64":
        assert elf_machine(tmp_path / "model.so") == EM_X86_64


@needs_cross
def test_arm64_library_is_aarch64(qdq_models, tmp_path):
    m = compile_onnx(qdq_models["exporter_w4"], "arm64", tmp_path)
    assert elf_machine(tmp_path / "model.so") == EM_AARCH64
    assert m["arch"] == "aarch64" and m["tvm_target"]["mattr"] == ["+neon", "+dotprod"]
    assert m["conv_layout"] == "NHWC" and m["ops"]["float_conv2d"] == 0 and m["ops"]["int_conv2d"] == 2


def _asm(qdq_path, target: str) -> str:
    mod, _ = import_onnx(qdq_path)
    tgt = get_target(target)
    ex, _ = build(lower_for_target(lower_qdq(mod), tgt), tgt)
    return ex.mod.imports[0].inspect_source("asm")


def test_arm64_dotprod_emits_sdot(qdq_models):
    """With +dotprod every conv kernel is the tensorized sdot kernel (and its parallel loop bodies hold the
    sdot); without it, no sdot anywhere."""
    from plateau.compile.asm import instructions_per_function

    sdot = instructions_per_function(_asm(qdq_models["ort_s8s8"], "arm64-dotprod"), "sdot")
    convs = {f: n for f, n in sdot.items() if "conv2d" in f}
    assert len(convs) == 2 and all(f.startswith("fused_plateau_conv2d_sdot") for f in convs), sdot
    assert not re.search(r"\bsdot\b", _asm(qdq_models["ort_s8s8"], "arm64-neon"))


@pytest.mark.slow
@needs_cross
@pytest.mark.parametrize("target", list_targets())
def test_every_target_builds(qdq_models, tmp_path, target):
    if get_target(target).device == "cuda" and shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH: the cuda build embeds kernels compiled by nvcc")
    m = compile_onnx(qdq_models["exporter_w8"], target, tmp_path)
    if get_target(target).arch == "aarch64":
        assert elf_machine(tmp_path / "model.so") == EM_AARCH64
    assert m["target"] == target and m["ops"]["float_conv2d"] == 0


@pytest.mark.parametrize("name", ["ort_s8s8", "ort_mobile", "exporter_w4"])
def test_nhwc_layout_is_exact_on_host(qdq_models, tmp_path, name):
    """arm64 targets build the integer conv in NHWC; run that same Relax on the host to check its numerics."""
    from support import compile_models as fx
    mod, _ = import_onnx(qdq_models[name])
    arm = get_target("arm64")
    assert arm.conv_layout == "NHWC"
    nhwc = lower_for_target(lower_qdq(mod), arm)
    convs = [b.value for blk in nhwc["main"].body.blocks for b in blk.bindings
             if getattr(b.value, "op", None) is not None and getattr(b.value.op, "name",
                                                                     "") == "relax.nn.conv2d"]
    assert convs and all(c.attrs.data_layout == "NHWC" and c.attrs.kernel_layout == "OHWI" for c in convs)
    ex, _ = build(nhwc, get_target("host"))
    ex.export_library(str(tmp_path / "model.so"))
    ref_nchw = fx.compare_to_ort(qdq_models[name], tmp_path / "model.so", n_batches=4)
    assert ref_nchw["max_steps"] <= 1 and ref_nchw["top1"] == 1.0, ref_nchw
    assert ref_nchw["exact"] >= 0.995, ref_nchw


_QEMU_RUNNER = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
np.save(sys.argv[3], vm["main"](tvm.runtime.tensor(np.load(sys.argv[2]))).numpy())
"""


@pytest.mark.qemu
@needs_cross
@pytest.mark.parametrize("name", ["exporter_w4", "ort_s8s8"])
def test_arm64_library_runs_under_qemu(qdq_models, tmp_path, name):
    """The cross-compiled library loads in the aarch64 TVM runtime (qemu) and matches the host numerics."""
    import os
    import subprocess

    import numpy as np
    from support import compile_models as fx

    runtime = pytest.importorskip("plateau.runtime")
    if runtime.sysroot_status() is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("arm64 sysroot / qemu not set up (make arm64-sysroot)")
    compile_onnx(qdq_models[name], "arm64", tmp_path)
    x = np.concatenate(fx.calibration_batches(2, 8, seed=5))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(_QEMU_RUNNER)
    subprocess.run([*runtime.arm64_python(), str(tmp_path / "run.py"), str(tmp_path / "model.so"),
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], check=True, timeout=300,
                   env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    from plateau.export.validate import ort_session

    ref = ort_session(str(qdq_models[name])).run(None, {"input": x})[0]
    steps = np.rint(np.abs(np.load(tmp_path / "y.npy") - ref) / output_step(qdq_models[name]))
    assert steps.max() <= 1 and (steps == 0).mean() >= 0.99, steps
