"""Byte sizes: parsed from flags (``5GB``, ``500MiB``) and printed for people (decimal units)."""

from __future__ import annotations

import re

from cq_core.errors import UsageError, quoted

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


#: The largest size a flag takes: 2^62 bytes (4.6 EB), far beyond any checkpoint, well inside int64.
MAX_SIZE = 1 << 62


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """``"5GB"``, ``"500MiB"``, ``"1000000"`` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UsageError(f"{flag} {quoted(text)} is not a size like 5GB, 500MB or 2GiB.")
        number = float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]  # inf for 5000 digits
        size = int(number) if number <= MAX_SIZE else MAX_SIZE + 1
    if size <= 0:
        raise UsageError(f"{flag} {quoted(text)} must be larger than zero.")
    if size > MAX_SIZE:
        raise UsageError(f"{flag} {quoted(text)} is larger than any file can be (at most {human_bytes(MAX_SIZE)}).")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def exact_bytes(n: int) -> str:
    """``10.00 KB (10000 bytes)``: the readable size and the exact count; below 1 KB only the
    count (``999 bytes``, ``1 byte``)."""
    if abs(n) < 1000:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    return f"{human_bytes(n)} ({n} bytes)"
