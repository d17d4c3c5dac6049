"""When a certificate should be renewed: at a fraction of its lifetime (default 2/3), minus a jitter.

The jitter spreads thousands of identities issued in the same second over a window instead of renewing them all
in the same second again; it only ever moves renewal earlier, never past the configured point.
"""

from __future__ import annotations

import datetime as dt
import hashlib

JITTER_FRACTION = 0.05  # up to 5 % of the lifetime earlier
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
) -> dt.datetime:
    lifetime = not_after - issued_at
    point = not_after - renew_before if renew_before is not None else issued_at + lifetime * renew_at_fraction
    point -= lifetime * (JITTER_FRACTION * jitter_fraction(seed))
    return max(issued_at, min(point, not_after - min(MIN_REMAINING, lifetime / 4)))
