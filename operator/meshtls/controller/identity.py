"""Reconciling one WorkloadIdentity as named steps: load (parse, resolve, publish the sidecar config), decide
(`policy.triggers.decide`), act (issue and write the Secret, or catch the status up), report (status, Events,
metrics, the next renewal time). No kopf here.

Called from kopf handlers (create, update, resume), from the renewal scheduler and when a managed Secret changes;
a per-identity lock makes those never race each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from meshtls.api.constants import ANNOTATION_RENEW, ANNOTATION_REVOKE, FINALIZER
from meshtls.api.durations import format_duration
from meshtls.api.model import (
    EffectiveIdentity,
    SpecError,
    WorkloadIdentitySpec,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.api.names import iso
from meshtls.api.objects import ABSENT
from meshtls.api.reasons import ConditionType, Reason
from meshtls.controller import metrics
from meshtls.controller.deletion import issuer_for_revocation, revoke_on_delete, trust_domain_deleted
from meshtls.controller.overlaps import recheck_overlaps, report_overlaps
from meshtls.controller.runtime import Operator, identity_lock, identity_ref, later
from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.sidecar_config import publish_sidecar_config
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.kube import Conflict
from meshtls.kube.client import ApiError
from meshtls.pki import CertificateAuthority, RevocationReason, RevokedCertificate
from meshtls.policy.certificate import dns_names_of
from meshtls.policy.issuance import (
    Superseded,
    condition,
    failed_status,
    floor_condition,
    issue_for,
    issued_status,
    merge_conditions,
    secret_body,
    secret_digest,
    superseded_by_spec,
    tracked_serials,
)
from meshtls.policy.namespaces import namespace_terminating
from meshtls.policy.triggers import CONFLICT, ISSUE, Decision, IdentityState, decide, event_reason, secret_renewal_time

log = logging.getLogger("meshtls.identity")
RETRY_INVALID = dt.timedelta(seconds=60)
RETRY_CONFLICT = dt.timedelta(seconds=30)
RETRY_ERROR = dt.timedelta(seconds=5)


def _event_fingerprint(meta: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an event worth a reconcile: a spec change (generation) or a renew/revoke request.

    Our own status and finalizer writes come back as events too; they change neither, so they cost nothing.
    """
    annotations = meta.get("annotations") or {}
    return (meta.get("uid"), meta.get("generation"), annotations.get(ANNOTATION_RENEW),
            annotations.get(ANNOTATION_REVOKE))


async def on_identity_event(op: Operator, event_type: str, body: dict[str, Any]) -> None:
    meta = body.get("metadata") or {}
    key = IdentityKey(str(meta.get("namespace")), str(meta.get("name")))
    finalizers = list(meta.get("finalizers") or [])
    if event_type == "DELETED":
        op.handled.pop(key, None)
        op.scheduler.forget(key)
        op.targets.remove(*key)
        op.secret_digests.pop(key, None)
        recheck_overlaps(op, key[0], op.selection.remove(*key))
        return
    if meta.get("deletionTimestamp"):
        if FINALIZER in finalizers:
            try:
                await revoke_on_delete(op, body)
                await op.kube.run(op.kube.remove_workload_identity_finalizer, key[0], key[1], FINALIZER, finalizers)
            except ApiError as exc:
                if namespace_terminating(exc.status, str(exc)):
                    # what could be revoked was published elsewhere; nothing more can be written in this namespace
                    with contextlib.suppress(Exception):
                        await op.kube.run(op.kube.remove_workload_identity_finalizer, key[0], key[1], FINALIZER,
                                          finalizers)
                    return
                log.warning("revoking %s/%s on deletion failed (%s); retrying in %.0f s", *key, exc,
                            RETRY_ERROR.total_seconds())
                later(op, RETRY_ERROR, _retry_deletion(op, key))
            except Exception as exc:  # kopf does not retry event handlers: try again with a fresh read
                log.warning("revoking %s/%s on deletion failed (%s); retrying in %.0f s", *key, exc,
                            RETRY_ERROR.total_seconds())
                later(op, RETRY_ERROR, _retry_deletion(op, key))
        return
    fingerprint = _event_fingerprint(meta)
    if op.handled.get(key) == fingerprint and FINALIZER in finalizers:
        return
    try:
        if FINALIZER not in finalizers:
            await op.kube.run(op.kube.add_workload_identity_finalizer, key[0], key[1], FINALIZER, finalizers,
                              meta.get("resourceVersion"))
        op.handled[key] = fingerprint
        await reconcile(op, key[0], key[1], body)
    except Exception as exc:  # kopf does not retry event handlers: the scheduler does
        op.handled.pop(key, None)
        log.warning("reconciling %s/%s failed (%s); retrying in %.0f s", *key, exc, RETRY_ERROR.total_seconds())
        op.scheduler.schedule(key, op.clock.now() + RETRY_ERROR)


async def _retry_deletion(op: Operator, key: IdentityKey) -> None:
    body = await op.kube.run(op.kube.get_workload_identity, *key)
    if body is not None:
        await on_identity_event(op, "MODIFIED", body)


async def reconcile(op: Operator, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
    key = IdentityKey(namespace, name)
    async with identity_lock(op, key):
        if body is None:
            body = await op.kube.run(op.kube.get_workload_identity, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            op.scheduler.forget(key)
            return
        try:
            await _reconcile_locked(op, key, body)
        except ApiError as exc:
            if not namespace_terminating(exc.status, str(exc)):
                raise
            # not an error: the namespace is going away with everything in it; its deletion finalizes the identity
            log.info("%s/%s: namespace %s is terminating; not reconciling it any more", namespace, name, namespace)
            op.scheduler.forget(key)


@dataclass
class _Resolved:
    """Step 1 (load): the identity as its trust domain makes it, with the status it had when this reconcile began."""

    key: IdentityKey
    body: dict[str, Any]
    status: dict[str, Any]
    annotations: dict[str, str]
    spec: WorkloadIdentitySpec
    runtime: TrustDomainRuntime
    identity: EffectiveIdentity


_SECRET_APPEARED = object()  # the act step's answer when the first create met an existing Secret


async def _reconcile_locked(op: Operator, key: IdentityKey, body: dict[str, Any]) -> None:
    """Load, decide, act, report. A first create that meets an existing Secret (ours from before a crash, or a
    stranger's) reads it and decides once more; any later conflict waits a second for the scheduler."""
    resolved = await _load(op, key, body)
    if resolved is None:
        return
    read_secret = False
    while True:
        state = await _read_state(op, resolved, read_secret)
        decision = decide(state)
        if decision.action == CONFLICT:
            await _fail(op, body, resolved.status, decision.reason, decision.message)
            op.scheduler.schedule(key, state.now + RETRY_CONFLICT)
            return
        if decision.action != ISSUE:
            await _confirm(op, resolved, state, decision)
            return
        if await _issue(op, resolved, state, decision) is not _SECRET_APPEARED:
            return
        if read_secret or state.secret.exists:
            op.scheduler.schedule(key, op.clock.now() + dt.timedelta(seconds=1))
            return
        read_secret = True  # the Secret exists after all: read it and decide again, once


async def _load(op: Operator, key: IdentityKey, body: dict[str, Any]) -> _Resolved | None:
    """Parse and resolve the identity; report its overlaps, bind it to its trust domain and publish its sidecar
    config. None when it cannot go further now (reported, and re-checked later)."""
    status: dict[str, Any] = dict(body.get("status") or {})
    annotations: dict[str, str] = dict(body["metadata"].get("annotations") or {})
    try:
        spec = parse_workload_identity(body)
        runtime = await op.trust.resolve(spec.trust_domain, status.get("trustDomain"), key)
        identity = resolve_identity(spec, runtime.spec)
    except (SpecError, TrustDomainError) as exc:
        reason = exc.reason
        message = str(exc) if isinstance(exc, SpecError) else exc.message
        await _fail(op, body, status, reason, message)
        op.scheduler.schedule(key, op.clock.now() + RETRY_INVALID)
        return None

    await report_overlaps(op, key, body, spec.service_account, spec.pod_selector, status)
    await op.trust.bind(runtime, key)
    try:
        await publish_sidecar_config(op, body, identity, runtime.spec.bundle_configmap)
    except SpecError as exc:
        await _fail(op, body, status, exc.reason, str(exc))
        # a config too large cannot shrink by itself: the next spec change (an event) tries again
        unfit = exc.reason in (Reason.SIDECAR_CONFIG_TOO_LARGE, Reason.SIDECAR_CONFIG_REFUSED)
        retry = RETRY_INVALID if unfit else RETRY_CONFLICT
        op.scheduler.schedule(key, op.clock.now() + retry)
        return None
    return _Resolved(key, body, status, annotations, spec, runtime, identity)


async def _read_state(op: Operator, resolved: _Resolved, read_secret: bool) -> IdentityState:
    """What `policy.triggers.decide` judges: the identity, its Secret, its trust domain's CAs, the status."""
    status, body, runtime = resolved.status, resolved.body, resolved.runtime
    # A brand-new identity has no Secret yet: create it without reading first. If one exists after all, the create
    # fails with a conflict and `_reconcile_locked` reads and decides again.
    never_reconciled = not status.get("serialNumber") and not status.get("conditions")
    if never_reconciled and not read_secret:
        secret = ABSENT
    else:
        secret = await op.kube.run(op.kube.read_secret, resolved.key[0], resolved.spec.secret_name)
    generation = body["metadata"].get("generation")
    return IdentityState(
        identity=resolved.identity, uid=body["metadata"]["uid"], annotations=resolved.annotations,
        handled_renew_request=status.get("lastRenewRequest"), secret=secret,
        ca_key_id=runtime.ca_key_id, ca_not_after=runtime.ca.not_after, now=op.clock.now(),
        issued_serial=status.get("serialNumber"), issued_spiffe_id=status.get("spiffeID"),
        issued_secret_name=status.get("secretName"),
        issued_not_before=_time_or_none(status.get("notBefore")),
        issued_serials=frozenset(str(e.get("serial")) for e in status.get("activeSerials") or []),
        trusted_cas=tuple(ca.certificate for ca in runtime.trusted), trusted_roots=_trusted_roots(runtime.trusted),
        generation=int(generation) if generation else None,
    )


async def _confirm(op: Operator, resolved: _Resolved, state: IdentityState, decision: Decision) -> None:
    """Nothing to issue: report the floor, catch the status up with the Secret if it lags, schedule the renewal."""
    (namespace, name), body, status, identity = resolved.key, resolved.body, resolved.status, resolved.identity
    now = state.now
    await _report_floor(op, body, status, decision.clamped, decision.message if decision.reason ==
                        Reason.RENEWAL_FLOOR else _floor_message(identity), now)
    due = iso(secret_renewal_time(state))
    if (status.get("serialNumber") != state.certificate().serial or not _is_ready(status)
            or status.get("renewalTime") != due):
        # status lags the Secret (operator restarted mid-write, recovered from an error, or the renewal point
        # in the spec changed): catch it up, finishing a spec change the restart interrupted
        superseded = superseded_by_spec(status, identity, False, now)
        revoked = await _revoke_superseded(op, body, superseded) if superseded is not None else frozenset()
        await op.kube.run(op.kube.patch_workload_identity_status, namespace, name, _status_from_secret(
            status, state, decision.message, now, revoked))
        serial, previous = state.certificate().serial, status.get("serialNumber")
        if serial != previous:  # the operator died between the Secret and its Event: nobody was told yet
            reason = Reason.ROTATED if previous else Reason.ISSUED
            await op.post_event(body, "Normal", reason, f"serial {previous or '-'} -> {serial} (recorded after an "
                                                        "operator restart)")
    assert decision.recheck_at is not None
    _record_metrics(namespace, name, str(identity.spiffe_id), state, decision.recheck_at)
    op.secret_digests[resolved.key] = secret_digest(state.secret.data)
    op.scheduler.schedule(resolved.key, decision.recheck_at)


async def _issue(op: Operator, resolved: _Resolved, state: IdentityState, decision: Decision) -> object:
    """Sign a certificate and write the Secret (one replace guarded by its resourceVersion), then report.
    Returns _SECRET_APPEARED when the Secret changed or appeared since it was read."""
    (namespace, name), body, status = resolved.key, resolved.body, resolved.status
    identity, runtime, annotations, secret = resolved.identity, resolved.runtime, resolved.annotations, state.secret
    now = state.now
    generation = body["metadata"].get("generation")
    previous_serial = status.get("serialNumber")
    had_certificate = bool(previous_serial) or (secret.exists and state.certificate().certificate is not None)
    old_cert = state.certificate().certificate if secret.exists else None
    dns_changed = old_cert is not None and sorted(dns_names_of(old_cert)) != sorted(resolved.spec.dns_names)
    superseded = superseded_by_spec(status, identity, dns_changed, now)
    if decision.revoke_current:
        await _revoke_current(op, runtime, state, annotations.get(ANNOTATION_REVOKE) or "")
    started = time.perf_counter()
    issuance = issue_for(identity, runtime.ca, now, on_schedule=decision.on_schedule)
    written = secret_body(identity, issuance, identity_ref(body), int(generation) if generation else None)
    try:
        await op.kube.run(op.kube.write_secret, written, secret)
    except ApiError as exc:
        if exc.status != 422:
            raise
        # the API server refuses the Secret itself (a name or label it cannot take): retrying cannot help
        await _fail(op, body, status, Reason.INVALID_SECRET,
                    f"the API server refused Secret {resolved.spec.secret_name}: {exc}")
        op.scheduler.schedule(resolved.key, op.clock.now() + RETRY_INVALID)
        return None
    except Conflict:
        return _SECRET_APPEARED  # the Secret changed (or exists) since we looked
    metrics.issuance_seconds.observe(time.perf_counter() - started)
    op.secret_digests[resolved.key] = secret_digest({k: v.encode() for k, v in written["stringData"].items()})
    reason = event_reason(decision, had_certificate)
    revoked = await _revoke_superseded(op, body, superseded) if superseded is not None else frozenset()
    new_status = issued_status(identity, issuance, status, rotated=had_certificate,
                               ca_fingerprint=runtime.ca.fingerprint, renew_request=annotations.get(ANNOTATION_RENEW),
                               now=now, revoked=revoked)
    await op.kube.run(op.kube.patch_workload_identity_status, namespace, name, new_status)
    await _report_floor(op, body, new_status, issuance.clamped, _floor_message(identity), now)
    if decision.revoke_current:
        await op.kube.run(op.kube.patch_workload_identity_annotations, namespace, name, {ANNOTATION_REVOKE: None})
    old = state.certificate().serial if secret.exists else None
    cert = issuance.certificate
    if reason == Reason.ISSUED:
        metrics.issued.inc()
        message = f"issued {identity.spiffe_id} serial {cert.serial_hex}, expires {cert.not_after:%H:%M:%SZ}"
    else:
        metrics.rotated.labels(decision.reason).inc()
        message = (f"serial {old or previous_serial} -> {cert.serial_hex}, expires {cert.not_after:%Y-%m-%dT%H:%M:%SZ}"
                   f" (in {format_duration(cert.not_after - now)}): {decision.message}")
    await op.post_event(body, "Normal", reason, message)
    log.info("%s/%s %s: %s", namespace, name, reason, message)
    metrics.expiration.labels(namespace, name, str(identity.spiffe_id)).set(cert.not_after.timestamp())
    metrics.renewal.labels(namespace, name, str(identity.spiffe_id)).set(issuance.renewal_time.timestamp())
    metrics.ready.labels(namespace, name, str(identity.spiffe_id)).set(1)
    op.scheduler.schedule(resolved.key, issuance.renewal_time)
    return None


async def _revoke_superseded(op: Operator, body: dict[str, Any], superseded: Superseded) -> frozenset[str]:
    """Revoke what a spec change left valid, each serial on the CRL of the trust domain that issued it, and remove
    the Secret under the old name (only ours). Returns the serials dealt with."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    now = op.clock.now()
    done: set[str] = set()
    told: list[str] = []
    for trust_domain, serials in superseded.serials.items():
        runtime, (why_reason, why) = await issuer_for_revocation(op, trust_domain)
        if runtime is None:
            if why_reason == Reason.TRUST_DOMAIN_GONE:
                # its CA is gone with it: no sidecar trusts those certificates any more, and there is no CRL to publish
                told.append(f"trust domain {trust_domain} is gone ({why}): {len(serials)} serial(s) need no CRL")
                done.update(serial for serial, _ in serials)
            else:  # unusable for now: they stay in activeSerials, and the identity's deletion revokes them again
                told.append(f"trust domain {trust_domain} cannot sign a CRL now ({why}); {len(serials)} serial(s) "
                            "kept for deletion")
            continue
        try:
            await op.trust.revoke(runtime, [RevokedCertificate(int(serial, 16), now, not_after,
                                                               RevocationReason.SUPERSEDED)
                                            for serial, not_after in serials])
        except Exception as exc:
            if await trust_domain_deleted(op, trust_domain):
                told.append(f"trust domain {trust_domain} was deleted: {len(serials)} serial(s) need no CRL")
                done.update(serial for serial, _ in serials)
                continue
            # they stay in activeSerials: the identity's deletion revokes them again
            log.warning("%s/%s: revoking superseded serials under %s failed: %s", namespace, name, trust_domain, exc)
            told.append(f"revoking {len(serials)} serial(s) under {trust_domain} failed ({exc}); kept for deletion")
            continue
        done.update(serial for serial, _ in serials)
        told.append(f"revoked {', '.join(s for s, _ in serials)} on the CRL of {trust_domain} "
                    f"(#{runtime.crl_number})")
    if superseded.old_secret_name:
        old = await op.kube.run(op.kube.read_secret, namespace, superseded.old_secret_name)
        if old.exists and old.owned_by(body["metadata"]["uid"]) and old.uid:
            await op.kube.run(op.kube.delete_secret, namespace, superseded.old_secret_name, old.uid)
            told.append(f"Secret {superseded.old_secret_name} deleted")
    message = f"{superseded.reason}: " + ("; ".join(told) or "nothing was left valid")
    log.info("%s/%s Superseded: %s", namespace, name, message)
    await op.post_event(body, "Normal", Reason.SUPERSEDED, message)
    return frozenset(done)


def _floor_message(identity: EffectiveIdentity) -> str:
    spec_point = (f"renewBefore {format_duration(identity.renew_before)}" if identity.renew_before is not None
                  else f"renewAtPercent {round(identity.renew_at_fraction * 100)}")
    return (f"{spec_point} with ttl {format_duration(identity.ttl)} would renew sooner than the re-issue floor "
            f"(a tenth of the lifetime, at least 1 s): renewals are held back to the floor")


async def _report_floor(op: Operator, body: dict[str, Any], status: dict[str, Any], clamped: bool, message: str,
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


def _trusted_roots(cas: list[CertificateAuthority]) -> frozenset[bytes]:
    return frozenset(root.public_bytes(serialization.Encoding.DER) for ca in cas for root in ca.roots)


def _time_or_none(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _is_ready(status: dict[str, Any]) -> bool:
    return any(c.get("type") == ConditionType.READY and c.get("status") == "True"
               for c in status.get("conditions") or [])


def _record_metrics(namespace: str, name: str, spiffe_id: str, state: IdentityState, due: dt.datetime) -> None:
    cert = state.certificate().certificate
    if cert is not None:
        metrics.expiration.labels(namespace, name, spiffe_id).set(cert.not_valid_after_utc.timestamp())
    metrics.renewal.labels(namespace, name, spiffe_id).set(due.timestamp())
    metrics.ready.labels(namespace, name, spiffe_id).set(1)


def _status_from_secret(status: dict[str, Any], state: IdentityState, message: str,
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


async def _fail(op: Operator, body: dict[str, Any], status: dict[str, Any], reason: str, message: str) -> None:
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


async def _revoke_current(op: Operator, runtime: TrustDomainRuntime, state: IdentityState, reason_text: str) -> None:
    cert = state.certificate().certificate
    if cert is None:
        return
    try:
        reason = RevocationReason.parse(reason_text) if reason_text else RevocationReason.UNSPECIFIED
    except ValueError:
        reason = RevocationReason.UNSPECIFIED
    await op.trust.revoke(runtime, [RevokedCertificate(cert.serial_number, op.clock.now(), cert.not_valid_after_utc,
                                                       reason)])
