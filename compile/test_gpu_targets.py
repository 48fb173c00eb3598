"""GPU targets: CUDA and OpenCL sources generated here (no GPU needed); running them is marked gpu."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from plateau.compile import compile_onnx, get_target, list_targets
from plateau.compile.gpu import runtime_available
from plateau.compile.onnx_prep import output_step

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None,
                                reason="nvcc not on PATH (the CUDA build embeds "
                                                                      "kernels compiled by nvcc)")


def test_gpu_targets_registered():
    assert {"cuda", "opencl"} <= set(list_targets())
    assert get_target("cuda").device == "cuda" and get_target("cuda").arch == "cuda"
    assert get_target("opencl").tvm_target["kind"] == "opencl"
    assert get_target("host").device == "cpu"


@pytest.fixture(scope="module")
def gpu_builds(qdq_models, tmp_path_factory) -> dict:
    out = {}
    for target, model in (("cuda", "ort_s8s8"), ("cuda-u8", "ort_u8s8"), ("opencl", "ort_s8s8")):
        if target.startswith("cuda") and shutil.which("nvcc") is None:
            continue
        d = tmp_path_factory.mktemp(target)
        out[target] = (d, compile_onnx(qdq_models[model], target.removesuffix("-u8"), d))
    return out


@needs_nvcc
def test_cuda_source_has_integer_kernels(gpu_builds):
    d, m = gpu_builds["cuda"]
    src = (d / m["device_source"]["path"]).read_text()
    assert m["ops"]["int_conv2d"] == 2 and m["ops"]["float_conv2d"] == 0
    convs = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w*conv2d\w*)\(([^)]*)\)", src)
    assert convs, "no conv kernel in the CUDA source"
    assert all("signed char" in args for _, args in convs)  # int8 operands, int32 accumulation
    # every conv and the matmul reduce with 4-byte dot products (gpu_dp4a.Dp4aMatmul)
    dp4a = m["device_source"]["dp4a"]
    assert {name for name, _ in convs} <= set(dp4a) and any("matmul" in k for k in dp4a), dp4a


@needs_nvcc
def test_cuda_dp4a_with_uint8_activations(gpu_builds):
    d, m = gpu_builds["cuda-u8"]
    assert sum(m["device_source"]["dp4a"].values()) == 3, m["device_source"]
    assert "__dp4a(*(uint*)" in (d / "model.cu").read_text()  # the unsigned x signed overload: u8 x s8


def test_opencl_source_has_integer_kernels(gpu_builds):
    d, m = gpu_builds["opencl"]
    src = (d / m["device_source"]["path"]).read_text()
    assert re.search(r"__kernel void \w*conv2d\w*\([^)]*__global char\*", src), "no int8 conv kernel"
    assert m["device_source"]["kernels"] >= 4 and "USE_OPENCL" in m["run_note"]


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["cuda", "opencl"])
def test_gpu_library_matches_onnxruntime(gpu_builds, qdq_models, target):
    import tvm
    from support import compile_models as fx
    from tvm import relax

    from plateau.export.validate import ort_session

    if target not in gpu_builds or not runtime_available(target):
        pytest.skip(f"no {target} runtime / device here")
    d, _ = gpu_builds[target]
    dev = tvm.cuda(0) if target == "cuda" else tvm.opencl(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(d / "model.so")), dev)
    x = np.concatenate(fx.calibration_batches(2, 8, seed=5))
    ours = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
    ref = ort_session(str(qdq_models["ort_s8s8"])).run(
        None, {"input": x})[0]
    steps = np.rint(np.abs(ours - ref) / output_step(qdq_models["ort_s8s8"]))
    assert steps.max() <= 1 and (steps == 0).mean() >= 0.99, steps


@needs_nvcc
def test_run_artifact_names_the_missing_gpu(gpu_builds):
    """plateau run / validate on a CUDA library where TVM sees no GPU: one line naming the library and the
    API."""
    from plateau.errors import PlateauError
    from plateau.runtime import run_artifact
    from plateau.runtime.run import artifact_device_api

    d, _ = gpu_builds["cuda"]
    assert artifact_device_api(d) == "cuda"
    if runtime_available("cuda"):
        pytest.skip("a CUDA GPU is present: test_run_artifact_on_the_gpu runs instead")
    x = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(PlateauError,
                       match=r"model\.so runs its kernels on a cuda GPU, and TVM finds none here"):
        run_artifact(d, x)


@pytest.mark.gpu
@needs_nvcc
def test_run_artifact_on_the_gpu(gpu_builds, qdq_models):
    """run_artifact picks the GPU from the compile manifest: same logits as the VM called directly, and
    timings."""
    import tvm
    from support import compile_models as fx
    from tvm import relax

    from plateau.runtime import run_artifact

    if not runtime_available("cuda"):
        pytest.skip("no CUDA GPU here")
    d, _ = gpu_builds["cuda"]
    x = np.concatenate(fx.calibration_batches(3, 8, seed=9))
    res = run_artifact(d, x, batch_size=5, timing=True)  # 24 rows in batches of 5: a short last batch
    dev = tvm.cuda(0)
    direct = relax.VirtualMachine(tvm.runtime.load_module(str(d / "model.so")), dev)["main"](
        tvm.runtime.tensor(x, dev)).numpy()
    np.testing.assert_array_equal(res.outputs, direct)
    assert res.info["device_api"] == "cuda" and dev.device_name in res.info["machine"]
    assert res.latency["batch_5"]["median_ms"] > 0
