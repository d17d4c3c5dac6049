"""When a certificate should be renewed: at a fraction of its lifetime (default 2/3), minus a jitter.

The jitter only ever moves renewal earlier, never past the configured point. A renewal on schedule moves up to 5 %
of the lifetime earlier. A certificate issued off schedule (a first issuance, a repair, a spec or CA change, a late
renewal after an outage) renews anywhere from a tenth of its lifetime up to the renewal point: a thousand
identities created in the same second then spread over the whole renewal period, and stay spread, instead of
renewing together again every cycle.
"""

from __future__ import annotations

import datetime as dt
import hashlib

JITTER_FRACTION = 0.05  # on schedule: up to 5 % of the lifetime earlier
EARLIEST_OFF_SCHEDULE = 0.1  # off schedule: anywhere from a tenth of the lifetime
MIN_REMAINING = dt.timedelta(seconds=2)  # never schedule a renewal closer than this to expiry


def jitter_fraction(seed: str) -> float:
    """A stable value in [0, 1) from a seed (the serial): the same certificate always renews at the same time."""
    digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def renewal_time(
    issued_at: dt.datetime,
    not_after: dt.datetime,
    renew_at_fraction: float,
    renew_before: dt.timedelta | None = None,
    seed: str = "",
    on_schedule: bool = True,
) -> dt.datetime:
    lifetime = not_after - issued_at
    point = not_after - renew_before if renew_before is not None else issued_at + lifetime * renew_at_fraction
    window = lifetime * JITTER_FRACTION
    if not on_schedule:
        window = max(window, point - (issued_at + lifetime * EARLIEST_OFF_SCHEDULE))
    point -= window * jitter_fraction(seed)
    return max(issued_at, min(point, not_after - min(MIN_REMAINING, lifetime / 4)))
