"""Durations as users write them in specs and flags: 90s, 5m, 1h, 1h30m, 2d (Go's time.Duration style)."""

from __future__ import annotations

import datetime as dt
import re

from meshtls.pki.errors import PKIError

_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d))+")
_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, field: str) -> dt.timedelta:
    """'1h30m' -> 5400 s; raises PKIError naming the field on anything else."""
    text = text.strip()
    if not _DURATION.fullmatch(text):
        raise PKIError(field, f"{text!r} is not a duration like 90s, 5m, 1h or 1h30m")
    try:
        return dt.timedelta(seconds=sum(int(n) * _SECONDS[u] for n, u in _PART.findall(text)))
    except OverflowError:  # more than timedelta's 999999999 days
        raise PKIError(field, f"{text[:40]!r} is too long a duration") from None


def format_duration(delta: dt.timedelta) -> str:
    """The shortest readable form: 1h, 20m, 1h30m, 45s (negative durations get a leading '-')."""
    total = round(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    return sign + ("".join(parts) or "0s")


def check_range(value: dt.timedelta, field: str, low: dt.timedelta, high: dt.timedelta) -> dt.timedelta:
    if not low <= value <= high:
        raise PKIError(field, f"{format_duration(value)} is outside the allowed range "
                              f"{format_duration(low)}-{format_duration(high)}")
    return value
