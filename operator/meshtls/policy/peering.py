"""Whether this replica must stand by: kopf's own rule, read from its peering object's status.

kopf pauses its watchers when a live peer has a higher priority; meshtls's own timers (the renewal heap, CA
rotation phases) and its webhook index must follow the same rule, or a paused replica keeps acting.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


def outranked_by_live_peer(status: Mapping[str, Any], priority: int, now: dt.datetime) -> bool:
    for info in status.values():
        if not isinstance(info, Mapping):
            continue
        try:
            peer_priority = int(info.get("priority", 0))
            lifetime = dt.timedelta(seconds=int(info.get("lifetime", 60)))
            lastseen = dt.datetime.fromisoformat(str(info["lastseen"]).replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError):
            continue
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=dt.UTC)
        if peer_priority > priority and lastseen + lifetime > now:
            return True
    return False
