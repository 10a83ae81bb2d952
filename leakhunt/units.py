"""Parsing and formatting of durations, sizes and rates, the way the CLI accepts and shows them.

Sizes: ``B``, ``KB``/``MB``/``GB``/``TB`` are decimal (10**3...), ``KiB``/``MiB``/``GiB``/``TiB`` and
the bare letters ``K``/``M``/``G``/``T`` are binary (as pmap and dd use them). Rates are a size per
``s``, ``min`` or ``h``. Shown values are binary (MiB, MiB/min).
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_TIME_UNITS = {"": 1.0, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII digits only (\d takes any script's), and few enough of them to stay a finite float.
_NUMBER = r"\s*([0-9]{1,19}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})\s*"
#: Past these a value is a typo, and past 2**63 it would overflow what it feeds.
MAX_SECONDS = 100 * 365 * 86400.0
MAX_BYTES = 1 << 62


def parse_duration(text: str) -> float:
    """'30s', '5m', '1.5h', '250ms' or a bare number of seconds -> seconds."""
    m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _TIME_UNITS:
        raise ValueError(f"not a duration: {text!r} (try 30s, 5m, 1h)")
    seconds = float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
    if seconds > MAX_SECONDS:
        raise ValueError(f"{text!r}: longer than a hundred years")
    return seconds


def parse_size(text: str) -> int:
    """'5MB', '1GiB', '512K' or a bare number of bytes -> bytes."""
    m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 512KiB, 5MB, 1GiB)")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2).lower()]
    size = int(number) * unit if number.isdigit() else float(number) * unit  # exact when whole
    if size >= MAX_BYTES:
        raise ValueError(f"{text!r}: more bytes than any machine has")
    return int(size)


def parse_rate(text: str) -> float:
    """'5MB/min', '1MiB/s', '200KB/h' -> bytes per second. A size without '/unit' is per second."""
    size, _, per = str(text).partition("/")
    seconds = _TIME_UNITS.get(per.strip().lower() or "s")
    if seconds is None:
        raise ValueError(f"not a rate: {text!r} (try 5MB/min, 1MiB/s)")
    return parse_size(size) / seconds


def format_bytes(n: float, signed: bool = False) -> str:
    """1536 -> '1.5 KiB'; signed=True adds '+' to growth."""
    sign = "-" if n < 0 else ("+" if signed and n > 0 else "")
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{n:.0f} B"
            return f"{sign}{n:.1f} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Bytes per second shown as MiB/min (the unit people think of leaks in)."""
    if bytes_per_s is None or (isinstance(bytes_per_s, float) and math.isnan(bytes_per_s)):
        return "n/a"
    per_min = bytes_per_s * 60
    if abs(per_min) >= 2**20 / 10:
        return f"{per_min / 2**20:+.2f} MiB/min"
    return f"{per_min / 2**10:+.1f} KiB/min"


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_share(fraction: float) -> str:
    """0.998 -> '99.8%' (never '100%' for what is not all), 0.42 -> '42%'."""
    pct = 100 * fraction
    if 99.5 <= pct < 100 or 0 < pct < 1:
        return f"{pct:.1f}%"
    return f"{pct:.0f}%"
