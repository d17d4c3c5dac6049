"""When a certificate should be renewed: at a fraction of its lifetime (default 2/3), minus a jitter.

The jitter only ever moves renewal earlier, never past the configured point. A renewal on schedule moves up to 5 %
of the lifetime earlier. A certificate issued off schedule (a first issuance, a repair, a spec or CA change, a late
renewal after an outage) renews anywhere from a tenth of its lifetime up to the renewal point: a thousand
identities created in the same second then spread over the whole renewal period, and stay spread, instead of
renewing together again every cycle.

Whatever the spec says (a CRD older than the operator may let `renewBefore: 59m59s` through), a certificate is
never renewed on schedule sooner than `reissue_floor` after it was issued: max(lifetime / 10, 1 s).
"""

from __future__ import annotations

import datetime as dt
import hashlib

JITTER_FRACTION = 0.05  # on schedule: up to 5 % of the lifetime earlier
EARLIEST_OFF_SCHEDULE = 0.1  # off schedule: anywhere from a tenth of the lifetime
MIN_REMAINING = dt.timedelta(seconds=2)  # never schedule a renewal closer than this to expiry
FLOOR_FRACTION = 0.1  # never re-issue on schedule more often than a tenth of the lifetime ...
FLOOR_MINIMUM = dt.timedelta(seconds=1)  # ... and never more often than once a second


def reissue_floor(lifetime: dt.timedelta) -> dt.timedelta:
    """The shortest time between two issuances that no schedule (spec, jitter, CA expiry) can undercut."""
    return max(lifetime * FLOOR_FRACTION, FLOOR_MINIMUM)


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
    return scheduled_renewal(issued_at, not_after, renew_at_fraction, renew_before, seed, on_schedule)[0]


def scheduled_renewal(
    issued_at: dt.datetime,
    not_after: dt.datetime,
    renew_at_fraction: float,
    renew_before: dt.timedelta | None = None,
    seed: str = "",
    on_schedule: bool = True,
) -> tuple[dt.datetime, bool]:
    """The renewal time, and whether the re-issue floor moved it later (the spec asked for a hot loop)."""
    lifetime = not_after - issued_at
    point = not_after - renew_before if renew_before is not None else issued_at + lifetime * renew_at_fraction
    unjittered = point
    window = lifetime * JITTER_FRACTION
    if not on_schedule:
        window = max(window, point - (issued_at + lifetime * EARLIEST_OFF_SCHEDULE))
    point -= window * jitter_fraction(seed)
    wanted = min(point, not_after - min(MIN_REMAINING, lifetime / 4))
    earliest = issued_at + reissue_floor(lifetime)
    # only the configured point counts as a clamp: jitter below the floor is ours to absorb, not the user's to hear
    configured = min(unjittered, not_after - min(MIN_REMAINING, lifetime / 4))
    return max(wanted, earliest), configured < earliest
