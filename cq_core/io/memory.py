"""How the converter's process allocates memory (Linux, best effort).

Three settings, each measured with ``cq convert`` to FP8 on the 1.4 GB
benchmark file (bench/bench_convert.py, 4-5 interleaved runs each):

- A fixed 16 MB glibc mmap threshold. glibc raises its threshold each time a
  large block is freed, so after the first few tensors every buffer of tens
  of MB would come from the heap arenas, where freed space stays counted in
  RSS (one arena per worker thread). Fixed, whole tensors go to mmap and back
  to the system on free: peak RSS 555-610 MB -> 513-528 MB.
- A 64 MB heap trim threshold. Fixing the mmap threshold also pins glibc's
  trim threshold at 128 KB, so each freed 1 MB chunk temporary at the top of
  the heap went back to the system and the next one faulted its pages in
  again: 575-770k -> 541k page faults, wall 5.2 -> 4.9 s (median), RSS +8 MB.
- Transparent huge pages for torch's large CPU tensors
  (``THP_MEM_ALLOC_ENABLE=1``, read by torch when it first allocates, so
  :mod:`cq_core` sets it before importing torch unless the environment
  already says otherwise): 541k -> 80k page faults, system time 2.5 -> 1.8 s,
  wall 4.8 -> 4.4 s (median).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20
#: torch's switch for 2 MB-aligned, huge-page-advised CPU allocations (Linux).
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def ask_torch_for_huge_pages() -> None:
    """Set torch's huge-page switch, unless set already; effective only before torch is imported."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault(TORCH_HUGE_PAGES, "1")


def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap and trim thresholds; True when they took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(trim)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
