"""arm64 artifacts under qemu-aarch64 give what the host build of the same module gives."""

from __future__ import annotations

import numpy as np
import pytest

from plateau.errors import PlateauError
from plateau.runtime import run_artifact

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("target", ["arm64", "arm64-dotprod"])
def test_int8_bit_identical_to_host(sysroot, artifacts, inputs, target):
    host = run_artifact(artifacts("host", "int8"), inputs)
    arm = run_artifact(artifacts(target, "int8"), inputs, device="qemu", batch_size=5)
    assert arm.device == "qemu" and arm.emulated is True
    assert arm.outputs.dtype == np.float32 and arm.outputs.shape == host.outputs.shape
    np.testing.assert_array_equal(arm.outputs, host.outputs)


def test_float_close_to_host(sysroot, artifacts, inputs):
    host = run_artifact(artifacts("host", "float"), inputs)
    arm = run_artifact(artifacts("arm64", "float"), inputs, device="qemu")
    np.testing.assert_allclose(arm.outputs, host.outputs, rtol=1e-4, atol=1e-4)


def test_static_batch_under_qemu(sysroot, artifacts, inputs):
    host = run_artifact(artifacts("host", "int8"), inputs)
    arm = run_artifact(artifacts("arm64", "int8", batch=4), inputs, device="qemu")
    np.testing.assert_array_equal(arm.outputs, host.outputs)


def test_timing_labelled_emulated(sysroot, artifacts, inputs):
    res = run_artifact(artifacts("arm64", "int8"), inputs, device="qemu", batch_size=8, timing=True)
    lat = res.latency
    assert lat["emulated"] is True and lat["representative"] is False and "emulated" in lat["note"]
    assert lat["batch_1"]["repeat"] >= 1 and lat["batch_8"]["median_ms"] > 0


def test_unloadable_artifact_under_qemu(sysroot, artifacts, inputs, tmp_path):
    # An aarch64 ELF that is not a TVM module: the error comes back from the emulated worker as one line.
    import shutil

    libz = sysroot / "rootfs" / "lib" / "aarch64-linux-gnu" / "libz.so.1"
    if not libz.exists():
        libz = sysroot / "rootfs" / "usr" / "lib" / "aarch64-linux-gnu" / "libz.so.1"
    shutil.copy(libz.resolve(), tmp_path / "model.so")
    with pytest.raises(PlateauError, match="cannot be loaded") as e:
        run_artifact(tmp_path / "model.so", inputs, device="qemu")
    assert "\n" not in str(e.value)
