"""Huge pages for the API's big anonymous mappings (Linux; skipped where THP is off)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from serving.memory import _regions, use_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages (kB) of the mappings overlapping [lo, hi)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and b > lo
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists(), reason="Linux THP only")
def test_a_big_array_is_found_and_backed_by_huge_pages() -> None:
    if "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this host")
    a = np.ones(96 << 20, dtype=np.uint8)  # 96 MB of touched anonymous memory
    lo = a.ctypes.data
    hi = lo + a.nbytes
    assert any(r_lo <= lo + (4 << 20) and hi - (4 << 20) <= r_hi for r_lo, r_hi in _regions(32 << 20))
    assert not any(r_hi - r_lo < (32 << 20) for r_lo, r_hi in _regions(32 << 20))
    done = use_huge_pages()
    assert done.regions >= 1 and done.bytes >= 64 << 20
    if done.collapsed:
        assert _anon_huge_kb(lo, hi) >= 32 << 10  # at least 32 MB of the array now on 2 MB pages
    assert int(a.sum()) == a.nbytes  # the contents are untouched
