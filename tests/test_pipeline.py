"""The whole pipeline through the CLI on a small run: train -> export -> compile -> validate, host and arm64."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def plateau(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "plateau", *args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    plateau("train", "--run", str(run), "--epochs", "2", "--train-limit", "3000", "--flatness", "off",
            "--eval-limit", "400")
    plateau("export", "--run", str(run), "--bits", "W8A8", "--eval-limit", "400", "--calib-images", "256")
    return run


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow
def test_stages_leave_manifests_and_reports(run):
    for stage in ("train", "export"):
        m = _manifest(run / stage)
        assert m["format"] == f"plateau.{stage}" and m["version"] == 1
    rep = json.loads((run / "export" / "report.json").read_text())
    c = rep["onnxruntime_vs_reference"]
    assert c["top1_agreement"] >= 0.999 and c["bit_exact"] >= 0.999 and c["max_steps"] <= 1, c


@pytest.mark.slow
def test_host_artifact_matches_reference(run):
    plateau("compile", "--run", str(run), "--target", "host")
    plateau("validate", "--run", str(run), "--target", "host")
    rep = json.loads((run / "validate" / "host" / "report.json").read_text())
    assert rep["device"] == "local" and not rep["emulated"]
    assert rep["device_vs_reference"]["top1_agreement"] >= 0.995
    assert rep["device_vs_reference"]["within_one_step"] >= 0.999


@pytest.mark.slow
@pytest.mark.qemu
def test_arm64_artifact_under_qemu_matches_reference(run):
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("aarch64-linux-gnu-gcc is not installed (make system-deps)")
    from plateau.runtime import sysroot_status

    if sysroot_status() is None:
        pytest.skip("the arm64 sysroot is not set up (make arm64-sysroot)")
    plateau("compile", "--run", str(run), "--target", "arm64")
    lib = run / "compile" / "arm64" / "model.so"
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    plateau("validate", "--run", str(run), "--target", "arm64", "--limit", "200")
    rep = json.loads((run / "validate" / "arm64" / "report.json").read_text())
    assert rep["device"] == "qemu" and rep["emulated"] and "emulated" in rep["note"]
    assert rep["device_vs_reference"]["top1_agreement"] >= 0.995
    assert rep["device_vs_reference"]["within_one_step"] >= 0.999


@pytest.mark.slow
def test_stale_artifact_is_refused(run, tmp_path):
    plateau("compile", "--run", str(run), "--target", "host")
    man = _manifest(run / "compile" / "host")
    man["inputs"]["onnx"]["sha256"] = "0" * 64
    (run / "compile" / "host" / "manifest.json").write_text(json.dumps(man))
    p = subprocess.run([sys.executable, "-m", "plateau", "validate", "--run", str(run), "--target", "host"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "stale" in p.stderr and "Traceback" not in p.stderr
