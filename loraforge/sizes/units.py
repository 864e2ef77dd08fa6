"""Sizes people read and write: '95GB' (decimal), '95G'/'95GiB' (binary), and one formatter."""

from __future__ import annotations

import re


_UNITS = {"": 1, "B": 1,
          "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}


def parse_size(text: str | int | float) -> int:
    """'95G' / '95GiB' -> 95 * 2**30 (binary, like df -h); '95GB' -> 95e9; plain numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 95G, 95GiB, 95GB, 1.5T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(n: int | float, signed: bool = False) -> str:
    """Binary units with one decimal: 61061000000 -> '56.9 GiB'."""
    sign = ("+" if n > 0 else "-" if n < 0 else " ") if signed else ("-" if n < 0 else "")
    v = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return f"{sign}{v:.1f} TiB"
