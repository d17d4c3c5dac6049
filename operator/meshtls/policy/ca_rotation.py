"""When a trust domain's CA rotates, as pure decisions over its phase and the clock.

Stable -> Preparing: a new CA joins every bundle beside the old one, but does not sign yet.
Preparing -> Rotating: after the propagation delay (kubelets have refreshed the mounted bundles), signing switches
    to the new CA and identities re-issue, spread over a window.
Rotating -> Stable: once the last certificate the old CA signed has expired, the old CA leaves the bundles.
A brought CA (spec.ca.secretRef) inside its window cannot be renewed by meshtls: the step is a warning until the team
replaces the Secret, then the rotation starts toward the replacement.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from enum import StrEnum


class RotationPhase(StrEnum):
    """Where a trust domain's CA rotation stands (status.rotation.phase and the state Secret)."""

    STABLE = "Stable"
    PREPARING = "Preparing"
    ROTATING = "Rotating"


class RotationAction(StrEnum):
    """What the controller does now (next_rotation_step)."""

    START = "start"  # generate (or take the brought) new CA and add it to every bundle: Stable -> Preparing
    SWITCH = "switch"  # sign with the new CA, re-issue spread over a window: Preparing -> Rotating
    RETIRE = "retire"  # drop the old CA from the bundles: Rotating -> Stable
    WARN = "warn"  # a brought CA inside its window: meshtls cannot renew it, the team must replace it
    WAIT = "wait"


STABLE, PREPARING, ROTATING = RotationPhase.STABLE, RotationPhase.PREPARING, RotationPhase.ROTATING


@dataclass(frozen=True)
class RotationState:
    phase: str = STABLE
    since: dt.datetime | None = None
    retire_after: dt.datetime | None = None  # Rotating: when the old CA may leave the bundles
    last_request: str | None = None  # the manual request (annotation value) already served

    def to_json(self) -> dict[str, str | None]:
        return {"phase": self.phase, "since": self.since.isoformat() if self.since else None,
                "retireAfter": self.retire_after.isoformat() if self.retire_after else None,
                "lastRequest": self.last_request}

    @classmethod
    def from_json(cls, doc: dict[str, str | None]) -> RotationState:
        def when(key: str) -> dt.datetime | None:
            value = doc.get(key)
            return dt.datetime.fromisoformat(value) if value else None

        return cls(str(doc.get("phase") or STABLE), when("since"), when("retireAfter"), doc.get("lastRequest"))


@dataclass(frozen=True)
class RotationStep:
    action: RotationAction
    reason: str
    next_check: dt.datetime | None = None


def rotation_window_open(ca_not_after: dt.datetime, rotate_before: dt.timedelta, now: dt.datetime) -> bool:
    return now >= ca_not_after - rotate_before


def next_rotation_step(state: RotationState, now: dt.datetime, ca_not_after: dt.datetime,
                       rotate_before: dt.timedelta, propagation_delay: dt.timedelta,
                       request: str | None = None, replacement_waiting: bool = False,
                       can_generate: bool = True) -> RotationStep:
    """What to do now; `replacement_waiting` is a brought CA that differs from the one signing.

    A brought CA cannot be renewed by meshtls (it has no key above it): inside its window meshtls warns and
    waits for the team to replace it, then rotates to the replacement.
    """
    if state.phase == STABLE:
        if replacement_waiting:
            return RotationStep(RotationAction.START, "the brought CA was replaced")
        if request and request != state.last_request and can_generate:
            return RotationStep(RotationAction.START, "CA rotation requested")
        if rotation_window_open(ca_not_after, rotate_before, now):
            if not can_generate:
                return RotationStep(RotationAction.WARN,
                                    f"the brought CA expires at {ca_not_after:%Y-%m-%dT%H:%M:%SZ}: replace the Secret "
                                    "named by spec.ca.secretRef",
                                    now + dt.timedelta(minutes=10))
            return RotationStep(RotationAction.START,
                                f"the CA expires at {ca_not_after:%Y-%m-%dT%H:%M:%SZ}, inside its rotation window")
        return RotationStep(RotationAction.WAIT, "CA valid", ca_not_after - rotate_before)
    assert state.since is not None
    if state.phase == PREPARING:
        switch_at = state.since + propagation_delay
        if now >= switch_at:
            return RotationStep(RotationAction.SWITCH, "the new CA has been in every bundle for the propagation delay")
        return RotationStep(RotationAction.WAIT, "new CA propagating", switch_at)
    if state.retire_after is not None and now >= state.retire_after:
        return RotationStep(RotationAction.RETIRE, "every certificate the old CA signed has expired")
    return RotationStep(RotationAction.WAIT, "old CA retiring", state.retire_after)


def reissue_delay(seed: str, spread: dt.timedelta) -> dt.timedelta:
    """Where in the spread window one identity re-issues after a CA switch (stable per identity)."""
    fraction = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big") / 2**64
    return spread * fraction
