"""run_artifact over TVM RPC on loopback: a native server, and an arm64 server under qemu-aarch64."""

from __future__ import annotations

import numpy as np
import pytest

from plateau.errors import PlateauError
from plateau.runtime import run_artifact, serve

pytestmark = pytest.mark.rpc


@pytest.fixture(scope="module")
def host_server():
    with serve(port=0, key="plateau-test", block=False, silent=True) as s:
        yield s


def test_host_rpc_equals_local(host_server, artifacts, inputs):
    local = run_artifact(artifacts("host", "int8"), inputs)
    res = run_artifact(artifacts("host", "int8"), inputs, device="rpc", rpc=host_server.address,
                       rpc_key="plateau-test", batch_size=7, timing=True)
    assert res.device == "rpc" and res.emulated is False and res.info["machine"] == "x86_64"
    np.testing.assert_array_equal(res.outputs, local.outputs)
    assert res.latency["representative"] is True and res.latency["batch_7"]["median_ms"] > 0


def test_rpc_wrong_key(host_server, artifacts, inputs):
    with pytest.raises(PlateauError, match=host_server.address):
        run_artifact(artifacts("host", "int8"), inputs, device="rpc", rpc=host_server.address,
                     rpc_key="wrong")


def test_rpc_refuses_foreign_artifact(host_server, artifacts, inputs):
    # The server reports its CPU (plateau.device.info): an aarch64 model is refused before upload.
    with pytest.raises(PlateauError, match="aarch64.*x86_64"):
        run_artifact(artifacts("arm64", "int8"), inputs, device="rpc", rpc=host_server.address,
                     rpc_key="plateau-test")


@pytest.mark.qemu
def test_emulated_arm64_rpc_equals_host(sysroot, artifacts, inputs):
    local = run_artifact(artifacts("host", "int8"), inputs)
    with serve(port=0, emulate=True, block=False, silent=True) as s:
        res = run_artifact(artifacts("arm64-dotprod", "int8"), inputs, device="rpc", rpc=s.address,
                           timing=True)
        # A second session on the same server works too (the server forks one process per session).
        again = run_artifact(artifacts("arm64", "float"), inputs, device="rpc", rpc=s.address)
    assert res.emulated is True and res.info["machine"] == "aarch64"
    assert res.latency["representative"] is False
    np.testing.assert_array_equal(res.outputs, local.outputs)
    np.testing.assert_allclose(again.outputs, run_artifact(artifacts("host", "float"), inputs).outputs,
                               rtol=1e-4, atol=1e-4)
    assert not s.alive()
