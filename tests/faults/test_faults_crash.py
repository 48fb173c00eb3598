"""Nothing lost (issue 14): a real SIGKILL at a chosen artifact of export, compile, train and validate, two
writers on one folder, leftovers of killed runs, the Makefile's clean-run. After each: the previous good files
are byte-identical, and the next command recovers or says exactly what to do. The full table (every case) is
bench/faults.py's."""

from __future__ import annotations

import pytest
from support.fault_cases import all_cases
from support.fault_harness import tiered


@pytest.mark.parametrize("case", tiered([c for c in all_cases() if c.issue == "data loss"]))
def test_nothing_lost(case, check_case):
    check_case(case)
