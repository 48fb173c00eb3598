"""The fault tests' shared state: one good run per session (train -> export -> compile -> validate on small_cnn
with synthetic data, ~30 s), which every case copies into its own workspace."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.fault_harness import Case, can_mount, can_run_unprivileged, make_good_run, run_case


@pytest.fixture(scope="session")
def fault_base():
    # Not under pytest's tmp_path: its parents are private to root, and the read-only cases run as nobody.
    base = Path(tempfile.mkdtemp(prefix="plateau-fault-tests-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def good_run(fault_base):
    return make_good_run(fault_base / "good", fault_base / "cache")


@pytest.fixture
def check_case(good_run, fault_base):
    """Run a case and fail with its verdict unless it passed."""
    def run(case: Case) -> None:
        if case.needs == "unprivileged" and not can_run_unprivileged():
            pytest.skip("a read-only folder cannot be tested as root without setpriv")
        if case.needs == "mount" and not can_mount():
            pytest.skip("no tmpfs can be mounted here (needs root with CAP_SYS_ADMIN)")
        v = run_case(case, good_run, fault_base / "cases")
        assert v.result == "pass", f"{case.id}: {v.result}: {v.detail}"
    return run
