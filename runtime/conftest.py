"""Fixtures for the runtime tests: tiny compiled artifacts (built once a session), the arm64 sysroot check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from support.runtime_models import build_tiny

from plateau.runtime.sysroot import sysroot_status


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory):
    """Lazily built {(target, kind, batch): folder}; each combination compiles once per session (~1 s)."""
    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple, Path] = {}

    def get(target: str = "host", kind: str = "int8", batch: int | None = None) -> Path:
        key = (target, kind, batch)
        if key not in cache:
            if target != "host" and shutil.which("aarch64-linux-gnu-gcc") is None:
                pytest.skip("aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)")
            folder = root / f"{target}-{kind}-{batch or 'N'}"
            build_tiny(folder, target, kind, batch=batch)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture(scope="session")
def inputs() -> np.ndarray:
    # 23 rows: not a multiple of the batch sizes used, so the last partial batch is exercised.
    return np.random.default_rng(7).standard_normal((23, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="session")
def sysroot() -> Path:
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 not installed: run `make arm64-sysroot`")
    if sysroot_status() is None:
        pytest.skip("arm64 sysroot not set up: run `make arm64-sysroot`")
    from plateau.runtime.sysroot import _default_root

    return _default_root()


@pytest.fixture(scope="session")
def direct_tvm():
    """The reference: plain TVM on the whole input at once, the way the artifact contract says it runs."""

    def run(folder: Path, x: np.ndarray) -> np.ndarray:
        import tvm

        vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(folder / "model.so")), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()

    return run
