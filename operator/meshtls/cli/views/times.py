"""Times as the CLI shows them: API timestamps parsed, durations kubectl style, "3m ago"."""

from __future__ import annotations

import datetime as dt
from typing import Any


def parse_time(value: Any) -> dt.datetime | None:
    """An API timestamp (RFC 3339, 'Z' or offset, with or without fractions) as an aware UTC datetime."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not value or not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)



def human_duration(delta: dt.timedelta) -> str:
    """Two units at most, kubectl style: 45s, 3m20s, 1h5m, 2d4h, 364d."""
    total = int(abs(delta.total_seconds()))
    sign = "-" if delta.total_seconds() < 0 and total else ""
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days >= 10:
        text = f"{days}d"
    elif days:
        text = f"{days}d{hours}h" if hours else f"{days}d"
    elif hours:
        text = f"{hours}h{minutes}m" if minutes else f"{hours}h"
    elif minutes:
        text = f"{minutes}m{seconds}s" if seconds and minutes < 10 else f"{minutes}m"
    else:
        text = f"{seconds}s"
    return sign + text


def ago(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "-"
    return f"{human_duration(now - t)} ago" if t <= now else f"in {human_duration(t - now)}"


def seconds_until(t: dt.datetime | None, now: dt.datetime) -> float | None:
    return round((t - now).total_seconds(), 3) if t else None
