"""What an identity's reconcile reports: its status from the Secret, a failure once per change, the re-issue
floor, metrics."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from meshtls.api.durations import format_duration
from meshtls.api.model import EffectiveIdentity
from meshtls.api.names import iso
from meshtls.api.reasons import ConditionType, Reason
from meshtls.controller import metrics
from meshtls.controller.runtime import Operator
from meshtls.policy.issuance import condition, failed_status, floor_condition, merge_conditions, tracked_serials
from meshtls.policy.triggers import IdentityState, secret_renewal_time

log = logging.getLogger("meshtls.identity")


def floor_message(identity: EffectiveIdentity) -> str:
    spec_point = (f"renewBefore {format_duration(identity.renew_before)}" if identity.renew_before is not None
                  else f"renewAtPercent {round(identity.renew_at_fraction * 100)}")
    return (f"{spec_point} with ttl {format_duration(identity.ttl)} would renew sooner than the re-issue floor "
            f"(a tenth of the lifetime, at least 1 s): renewals are held back to the floor")


async def report_floor(op: Operator, body: dict[str, Any], status: dict[str, Any], clamped: bool, message: str,
                        now: dt.datetime) -> None:
    """Once per change, not per clamp: a condition and a Warning Event when the floor starts holding back."""
    changed = floor_condition(status.get("conditions"), clamped, message, now)
    if changed is None:
        return
    status["conditions"] = merge_conditions(status.get("conditions"), [changed])
    meta = body["metadata"]
    await op.kube.run(op.kube.patch_workload_identity_status, meta["namespace"], meta["name"],
                      {"conditions": status["conditions"]})
    if clamped:
        await op.post_event(body, "Warning", Reason.RENEWAL_FLOOR, message)


def is_ready(status: dict[str, Any]) -> bool:
    return any(c.get("type") == ConditionType.READY and c.get("status") == "True"
               for c in status.get("conditions") or [])


def record_metrics(namespace: str, name: str, spiffe_id: str, state: IdentityState, due: dt.datetime) -> None:
    cert = state.certificate().certificate
    metrics.record_identity(namespace, name, spiffe_id, cert.not_valid_after_utc.timestamp() if cert is not None
                            else None, due.timestamp())


def status_from_secret(status: dict[str, Any], state: IdentityState, message: str,
                        now: dt.datetime, revoked: frozenset[str] = frozenset()) -> dict[str, Any]:
    cert = state.certificate().certificate
    assert cert is not None
    serial = format(cert.serial_number, "x")
    active = tracked_serials(status.get("activeSerials"), None, now, dropped=revoked)
    if not any(e.get("serial") == serial for e in active):
        active.append({"serial": serial, "notAfter": iso(cert.not_valid_after_utc),
                       "trustDomain": state.identity.trust_domain})
    return {
        "spiffeID": str(state.identity.spiffe_id),
        "trustDomain": state.identity.trust_domain,
        "secretName": state.identity.spec.secret_name,
        "serialNumber": serial,
        "notBefore": iso(cert.not_valid_before_utc),
        "notAfter": iso(cert.not_valid_after_utc),
        "renewalTime": iso(secret_renewal_time(state)),
        "activeSerials": active,
        "conditions": merge_conditions(status.get("conditions"), [
            condition(ConditionType.READY, True, Reason.ISSUED, message, now),
            condition(ConditionType.ISSUING, False, Reason.ISSUED, "certificate is up to date", now),
        ]),
    }


async def report_failure(op: Operator, body: dict[str, Any], status: dict[str, Any], reason: str, message: str) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == ConditionType.READY),
                                 {})
    metrics.failures.labels(reason).inc()
    if ready.get("status") == "False" and ready.get("reason") == reason and ready.get("message") == message:
        return  # already reported: no new Event, no write (a stuck identity must not spin)
    log.warning("%s/%s not ready: %s: %s", namespace, name, reason, message)
    await op.kube.run(op.kube.patch_workload_identity_status, namespace, name,
                      failed_status(status, reason, message, op.clock.now()))
    await op.post_event(body, "Warning", reason, message)
