"""run_artifact on this machine: equals plain TVM, batches correctly, turns bad inputs into PlateauError."""

from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from plateau.errors import PlateauError
from plateau.runtime import add_device_arguments, device_main, elf_machine, list_devices, run_artifact


def test_list_devices():
    assert list_devices() == ["local", "qemu", "rpc"]


@pytest.mark.parametrize("kind", ["int8", "float"])
@pytest.mark.parametrize("batch_size", [1, 5, 100])
def test_local_equals_direct_tvm(artifacts, inputs, direct_tvm, kind, batch_size):
    folder = artifacts("host", kind)
    res = run_artifact(folder / "model.so", inputs, batch_size=batch_size)
    assert res.device == "local" and res.emulated is False and res.latency is None
    assert res.outputs.dtype == np.float32 and res.outputs.shape == (len(inputs), 10)
    ref = direct_tvm(folder, inputs)
    if kind == "int8":
        np.testing.assert_array_equal(res.outputs, ref)  # integer model: batching cannot change a bit
    else:
        np.testing.assert_allclose(res.outputs, ref, rtol=1e-5, atol=1e-5)


def test_local_accepts_folder_and_casts_dtype(artifacts, inputs):
    folder = artifacts("host", "int8")
    a = run_artifact(folder, inputs.astype(np.float64))
    b = run_artifact(folder / "model.so", inputs)
    np.testing.assert_array_equal(a.outputs, b.outputs)


def test_static_batch_pads_last_chunk(artifacts, inputs, direct_tvm):
    fixed = artifacts("host", "int8", batch=4)
    dynamic = artifacts("host", "int8")
    res = run_artifact(fixed, inputs, batch_size=100)  # the manifest's batch 4 wins over batch_size
    assert res.info["batch"] == 4
    np.testing.assert_array_equal(res.outputs, direct_tvm(dynamic, inputs))


def test_local_timing(artifacts, inputs):
    res = run_artifact(artifacts("host", "int8"), inputs, batch_size=8, timing=True)
    lat = res.latency
    assert set(lat) >= {"batch_1", "batch_8", "emulated", "representative"}
    assert lat["emulated"] is False and lat["representative"] is True
    for k in ("batch_1", "batch_8"):
        assert 0 < lat[k]["min_ms"] <= lat[k]["median_ms"] <= lat[k]["p90_ms"]


def test_elf_machine(artifacts, tmp_path):
    assert elf_machine(artifacts("host", "int8") / "model.so") == "x86_64"
    assert elf_machine(artifacts("arm64", "int8") / "model.so") == "aarch64"
    (tmp_path / "junk.so").write_bytes(b"not an elf at all, just text")
    with pytest.raises(PlateauError, match="not an ELF"):
        elf_machine(tmp_path / "junk.so")


# --- errors -------------------------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_artifact(tmp_path, inputs):
    with pytest.raises(PlateauError, match="no such compiled model") as e:
        run_artifact(tmp_path / "nope" / "model.so", inputs)
    _one_line(e)


def test_corrupt_artifacts(artifacts, tmp_path, inputs):
    bad = tmp_path / "text"
    bad.mkdir()
    (bad / "model.so").write_bytes(b"garbage" * 10)
    with pytest.raises(PlateauError, match="not an ELF"):
        run_artifact(bad / "model.so", inputs)
    # A truncated ELF (no manifest to compare with): refused before dlopen, which would die of SIGBUS.
    good = (artifacts("host", "int8") / "model.so").read_bytes()
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "model.so").write_bytes(good[: len(good) // 2])
    with pytest.raises(PlateauError, match="truncated") as e:
        run_artifact(trunc / "model.so", inputs)
    _one_line(e)
    # One flipped byte, with the manifest beside it: the recorded sha256 catches it.
    flipped = tmp_path / "flipped"
    shutil.copytree(artifacts("host", "int8"), flipped)
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    (flipped / "model.so").write_bytes(bytes(data))
    with pytest.raises(PlateauError, match="sha256 differs"):
        run_artifact(flipped, inputs)
    # A well-formed shared object that is not a TVM module.
    libz = next((p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1")
                 if Path(p).is_file()), None)
    if libz:
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(libz, other / "model.so")
        with pytest.raises(PlateauError, match="cannot be loaded") as e:
            run_artifact(other / "model.so", inputs)
        _one_line(e)
    # A corrupt manifest beside a good model.so.
    man = tmp_path / "man"
    shutil.copytree(artifacts("host", "int8"), man)
    (man / "manifest.json").write_text("{ not json")
    with pytest.raises(PlateauError, match="corrupt manifest"):
        run_artifact(man, inputs)


def test_arm64_artifact_refused_locally(artifacts, inputs):
    with pytest.raises(PlateauError, match="device 'qemu'.*'rpc'") as e:
        run_artifact(artifacts("arm64", "int8"), inputs, device="local")
    assert "aarch64" in _one_line(e)


def test_host_artifact_refused_under_qemu(artifacts, inputs):
    with pytest.raises(PlateauError, match="not aarch64.*'local'"):
        run_artifact(artifacts("host", "int8"), inputs, device="qemu")


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 3, 9, 8), np.float32), r"model takes \(N, 3, 8, 8\)"),
        (np.zeros((3, 8, 8), np.float32), r"model takes"),
        (np.zeros((0, 3, 8, 8), np.float32), "at least one row"),
        (np.full((2, 3, 8, 8), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "numeric"),
    ],
)
def test_bad_inputs(artifacts, bad, match):
    with pytest.raises(PlateauError, match=match) as e:
        run_artifact(artifacts("host", "int8"), bad)
    _one_line(e)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "gpu"}, "unknown device"),
        ({"batch_size": 0}, "batch_size"),
        ({"rpc": "127.0.0.1:9090"}, "only used with device='rpc'"),
        ({"device": "rpc"}, "needs rpc='host:port'"),
        ({"device": "rpc", "rpc": "no-port"}, "must be host:port"),
    ],
)
def test_bad_options(artifacts, inputs, kwargs, match):
    with pytest.raises(PlateauError, match=match):
        run_artifact(artifacts("host", "int8"), inputs, **kwargs)


def test_qemu_without_sysroot(artifacts, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("PLATEAU_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PlateauError, match="make arm64-sysroot"):
        run_artifact(artifacts("arm64", "int8"), inputs, device="qemu")


def test_unreachable_rpc_names_address(artifacts, inputs):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PlateauError, match=f"127.0.0.1:{port}") as e:
        run_artifact(artifacts("host", "int8"), inputs, device="rpc", rpc=f"127.0.0.1:{port}")
    _one_line(e)


def test_device_cli_parses(capsys):
    ap = argparse.ArgumentParser()
    add_device_arguments(ap)
    args = ap.parse_args(["serve", "--port", "0", "--key", "k", "--emulate"])
    assert (args.host, args.port, args.key, args.emulate) == ("127.0.0.1", 0, "k", True)
    assert device_main(ap.parse_args(["list"])) == 0
    assert capsys.readouterr().out.split() == ["local", "qemu", "rpc"]


def test_rpc_to_something_else_names_address(artifacts, inputs):
    # Something listens, but it is not a TVM RPC server: it answers with junk and hangs up.
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(PlateauError, match=f"127.0.0.1:{port}") as e:
            run_artifact(artifacts("host", "int8"), inputs, device="rpc", rpc=f"127.0.0.1:{port}")
        _one_line(e)
    finally:
        srv.close()


def test_static_batch_without_manifest(artifacts, inputs, tmp_path):
    # Without the manifest the runtime cannot know the batch is fixed: a clear error, not a TVM traceback.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(artifacts("host", "int8", batch=4) / "model.so", bare / "model.so")
    with pytest.raises(PlateauError, match="fixed batch") as e:
        run_artifact(bare / "model.so", inputs, batch_size=4)  # 23 rows: the last chunk has 3
    _one_line(e)
    # Exact multiples run; a timing size the model cannot take is reported, not fatal.
    res = run_artifact(bare / "model.so", inputs[:8], batch_size=4, timing=True)
    assert res.outputs.shape == (8, 10)
    assert "error" in res.latency["batch_1"] and res.latency["batch_4"]["median_ms"] > 0


def test_serve_port_in_use():
    from plateau.runtime import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(PlateauError, match=f"127.0.0.1:{port}"):
            serve(port=port, block=False, silent=True)
