"""The CLI as a user meets it: bad input is one line naming the problem, a non-zero exit, no traceback, and nothing
already in the run folder is overwritten half-way."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plateau.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def plateau(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plateau", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, pattern: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and pattern in lines[0], p.stderr


def test_help_lists_every_stage(tmp_path):
    p = plateau("--help", cwd=tmp_path)
    assert p.returncode == 0
    for cmd in ("train", "export", "compile", "validate", "bench", "device"):
        assert cmd in p.stdout
    for cmd in ("export", "compile", "validate"):
        q = plateau(cmd, "--help", cwd=tmp_path)
        assert q.returncode == 0 and "--run" in q.stdout


def test_bad_bits(tmp_path):
    assert_one_line_error(plateau("export", "--bits", "W9A8", cwd=tmp_path), "bad BITS 'W9A8'")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(plateau("export", "--checkpoint", "nope.pt", "--model", "small_cnn", cwd=tmp_path),
                          "checkpoint nope.pt: no such file")


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(plateau("export", "--checkpoint", "bad.pt", "--model", "small_cnn", cwd=tmp_path),
                          "cannot be read as a torch checkpoint")


def test_checkpoint_from_another_model(tmp_path):
    torch.save({"state_dict": create_model("small_cnn").state_dict()}, tmp_path / "cnn.pt")
    assert_one_line_error(plateau("export", "--checkpoint", "cnn.pt", "--model", "cifar_resnet20", cwd=tmp_path),
                          "does not fit model cifar_resnet20")


def test_unknown_model_and_target(tmp_path):
    assert_one_line_error(plateau("train", "--model", "resnet_nope", "--run", "r", cwd=tmp_path),
                          "unknown model 'resnet_nope'")
    assert_one_line_error(plateau("compile", "--target", "sparc", "--onnx", str(tmp_path / "x.onnx"),
                                  cwd=tmp_path), "sparc")


def test_data_that_is_not_an_imagefolder(tmp_path):
    (tmp_path / "flat").mkdir()
    assert_one_line_error(plateau("train", "--data", "flat", "--run", "r", cwd=tmp_path),
                          "not an ImageFolder tree")


def test_missing_stage_input_names_the_manifest(tmp_path):
    assert_one_line_error(plateau("compile", "--run", "runs/none", cwd=tmp_path), "no export manifest")


def test_corrupt_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    p = plateau("compile", "--onnx", "bad.onnx", "--run", "r", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "bad.onnx" in p.stderr


@pytest.mark.parametrize("bits", ["W8A8"])
def test_failed_export_keeps_previous_artifacts(tmp_path, bits):
    """A run folder's files survive a failing re-run of the stage."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model_qdq.onnx").write_bytes(b"previous")
    torch.save({"state_dict": create_model("small_cnn").state_dict()}, tmp_path / "cnn.pt")
    p = plateau("export", "--run", str(run), "--checkpoint", "cnn.pt", "--model", "cifar_resnet20",
                "--bits", bits, cwd=tmp_path)
    assert p.returncode == 2
    assert (run / "export" / "model_qdq.onnx").read_bytes() == b"previous"
    assert not [f for f in (run / "export").iterdir() if f.name.endswith(".tmp")]
