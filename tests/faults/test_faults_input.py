"""Nothing silently wrong (issue 14): bad options, damaged manifests and arrays, NaN weights, classes that do not
match, unlowerable ops, read-only folders and full disks. Each gives exit 2 and one stderr line naming the file
or option, no traceback, and leaves every existing file as it was; valid variants still succeed."""

from __future__ import annotations

import pytest
from support.fault_cases import all_cases
from support.fault_harness import tiered


@pytest.mark.parametrize("case", tiered([c for c in all_cases() if c.issue != "data loss"]))
def test_one_line_and_nothing_changed(case, check_case):
    check_case(case)
