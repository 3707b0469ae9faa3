"""Transparent huge pages for the API's big in-memory structures (Linux).

An HNSW search visits a few thousand graph nodes spread over hundreds of megabytes (1M items:
four hnswlib shards of ~165 MB each, plus the exact-score vector copies and the catalog
columns). With 4 KB pages nearly every visit also misses the TLB. Where the kernel gives huge
pages only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the
default of many distributions and of this machine), :func:`use_huge_pages` asks for them on the
process's large anonymous mappings: ``MADV_HUGEPAGE`` (later page faults there get 2 MB pages)
and ``MADV_COLLAPSE`` (Linux >= 6.1: the pages already there are merged now, synchronously;
~2-3 s for 1.6 GB). In process this made a recommendation ~15-20% cheaper (1.1-1.3 ms ->
0.9-1.1 ms of CPU, mostly hnswlib).

Nothing here is needed for correctness; any failure (another OS, THP disabled, an older kernel)
leaves the memory as it was.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass

__all__ = ["HugePages", "use_huge_pages"]

log = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_HUGE = 2 << 20


@dataclass(frozen=True, slots=True)
class HugePages:
    """What :func:`use_huge_pages` did."""

    regions: int = 0
    bytes: int = 0
    collapsed: int = 0


def _regions(min_bytes: int) -> list[tuple[int, int]]:
    """2 MB-aligned [start, end) of the anonymous read-write mappings of at least ``min_bytes``."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[5] != "[heap]":
                continue  # a file, the stack, vdso, ...: only anonymous memory and the malloc heap
            if not parts[1].startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            lo, hi = (lo + _HUGE - 1) & ~(_HUGE - 1), hi & ~(_HUGE - 1)
            if hi - lo >= min_bytes:
                out.append((lo, hi))
    return out


def use_huge_pages(min_bytes: int = 32 << 20) -> HugePages:
    """Ask for transparent huge pages on the large anonymous mappings (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        return HugePages()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        regions = _regions(min_bytes)
    except OSError as exc:
        log.info("huge pages not requested: %s", exc)
        return HugePages()
    advised = collapsed = total = 0
    for lo, hi in regions:
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            continue
        advised += 1
        total += hi - lo
        if madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            collapsed += hi - lo
    return HugePages(regions=advised, bytes=total, collapsed=collapsed)
