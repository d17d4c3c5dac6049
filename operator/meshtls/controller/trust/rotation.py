"""Advancing a trust domain's CA rotation (Stable -> Preparing -> Rotating -> Stable) as far as the clock allows;
the transitions themselves are decided in `policy.ca_rotation`."""

from __future__ import annotations

import datetime as dt
import logging

from meshtls.api.names import iso
from meshtls.api.reasons import Reason
from meshtls.controller.trust.domain import TrustDomainRuntime
from meshtls.pki import CertificateAuthority, generate_ca
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE, RotationAction, RotationState, next_rotation_step
from meshtls.policy.trust_policy import crl_resign_at

log = logging.getLogger("meshtls.trust")


def rotate_before(runtime: TrustDomainRuntime) -> dt.timedelta:
    """The rotation window, relative to the signing CA's own lifetime (a brought CA's may differ from the spec)."""
    return runtime.spec.rotate_before(runtime.ca.not_after - runtime.ca.not_before)


def advance(runtime: TrustDomainRuntime, now: dt.datetime, request: str | None,
            replacement: CertificateAuthority | None) -> list[tuple[str, str]]:
    """Move the CA rotation forward as far as the clock allows; returns (Event reason, message) per step."""
    spec = runtime.spec
    changes: list[tuple[str, str]] = []
    for _ in range(3):
        step = next_rotation_step(runtime.rotation, now, runtime.ca.not_after, rotate_before(runtime),
                                  spec.ca_propagation_delay, request, replacement is not None,
                                  can_generate=spec.ca_secret_ref is None)
        if step.action == RotationAction.WARN:
            runtime.warning = step.reason
            break
        runtime.warning = None
        if step.action == RotationAction.START:
            runtime.next_ca = replacement or generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
            runtime.rotation = RotationState(PREPARING, now, None, request or runtime.rotation.last_request)
            replacement = None
            changes.append((Reason.CA_ROTATION_STARTED,
                            f"{step.reason}: new CA sha256:{runtime.next_ca.fingerprint[:16]} added to every "
                            f"bundle; it signs after {spec.ca_propagation_delay.total_seconds():.0f} s"))
        elif step.action == RotationAction.SWITCH:
            assert runtime.next_ca is not None
            # the old CA's last leaf lives at most maxTTL from now; keep it trusted until then
            runtime.previous_ca, runtime.ca, runtime.next_ca = runtime.ca, runtime.next_ca, None
            retire = now + spec.policy.max_ttl + dt.timedelta(seconds=5)
            runtime.rotation = RotationState(ROTATING, now, retire, runtime.rotation.last_request)
            changes.append((Reason.CA_ROTATED, f"signing switched to CA sha256:{runtime.ca.fingerprint[:16]}; "
                                         f"identities re-issue now; old CA trusted until {iso(retire)}"))
        elif step.action == RotationAction.RETIRE:
            old = runtime.previous_ca
            runtime.previous_ca = None
            runtime.rotation = RotationState(STABLE, now, None, runtime.rotation.last_request)
            changes.append((Reason.CA_RETIRED, f"old CA sha256:{old.fingerprint[:16] if old else '-'} removed from "
                                         "every bundle"))
        else:
            break
        log.info("trust domain %s: %s", spec.name, changes[-1][1])
    return changes


def next_phase_check(runtime: TrustDomainRuntime, now: dt.datetime, resync: dt.timedelta) -> dt.datetime | None:
    """When the trust domain is looked at again: its next rotation step, its CRL re-signing, or a resync."""
    spec = runtime.spec
    step = next_rotation_step(runtime.rotation, now, runtime.ca.not_after, rotate_before(runtime),
                              spec.ca_propagation_delay, can_generate=spec.ca_secret_ref is None)
    # federated bundles live in objects we do not watch: look again periodically
    due = [now + resync]
    if step.next_check:
        due.append(step.next_check)
    if runtime.crl_signed is not None:
        due.append(crl_resign_at(runtime.crl_signed[0], spec.crl_validity))
    return min(due)
