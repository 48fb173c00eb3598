"""The arm64 sysroot: a half-done or stale set-up is not trusted; a complete one is reused at once."""

from __future__ import annotations

import json
import time

import pytest

from plateau.errors import PlateauError
from plateau.runtime import ensure_arm64_sysroot, sysroot_status
from plateau.runtime import sysroot as sr


def _fake_complete(root):
    (root / "rootfs" / "usr" / "bin").mkdir(parents=True)
    (root / "rootfs" / "usr" / "bin" / "python3.11").write_text("")
    (root / "site" / "tvm").mkdir(parents=True)
    (root / "COMPLETE").write_text(json.dumps({"recipe": sr._RECIPE}))


def test_stamp_decides_completeness(tmp_path):
    assert sysroot_status(tmp_path) is None  # nothing there
    _fake_complete(tmp_path)
    assert sysroot_status(tmp_path) is not None
    (tmp_path / "COMPLETE").write_text("{half")  # torn stamp
    assert sysroot_status(tmp_path) is None
    (tmp_path / "COMPLETE").write_text(json.dumps({"recipe": "older-recipe"}))  # another package list
    assert sysroot_status(tmp_path) is None
    (tmp_path / "COMPLETE").unlink()  # killed before the stamp: rebuilt, not trusted
    assert sysroot_status(tmp_path) is None


def test_arm64_python_needs_setup(tmp_path):
    with pytest.raises(PlateauError, match="make arm64-sysroot"):
        sr.arm64_python(tmp_path)


def test_failing_step_is_named(monkeypatch):
    monkeypatch.setattr(sr.subprocess, "run", lambda *a, **k: sr.subprocess.CompletedProcess(
        a[0], 100, "", "W: some warning\nE: Unable to locate package python3.11:arm64\n"))
    with pytest.raises(PlateauError, match="step 'apt-get update' failed: E: Unable to locate") as e:
        sr._run("apt-get update", ["apt-get", "update"])
    assert "\n" not in str(e.value)


@pytest.mark.qemu
def test_complete_sysroot_is_reused_at_once(sysroot):
    t0 = time.monotonic()
    assert ensure_arm64_sysroot(sysroot, quiet=True) == sysroot.resolve()
    assert time.monotonic() - t0 < 1.0
    assert sysroot_status(sysroot)["machine"] == "aarch64"
