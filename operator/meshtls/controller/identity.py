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
from meshtls.api.reasons import Reason
from meshtls.controller import metrics
from meshtls.controller.deletion import revoke_on_delete, revoke_superseded
from meshtls.controller.identity_status import (
    floor_message,
    is_ready,
    record_metrics,
    report_failure,
    report_floor,
    status_from_secret,
)
from meshtls.controller.overlaps import recheck_overlaps, report_overlaps
from meshtls.controller.runtime import Operator, identity_lock, identity_ref, later
from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.sidecar_config import publish_sidecar_config
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.kube import Conflict
from meshtls.kube.client import ApiError, NotFound
from meshtls.pki import CertificateAuthority, RevocationReason, RevokedCertificate
from meshtls.policy.certificate import dns_names_of
from meshtls.policy.issuance import issue_for, issued_status, secret_body, secret_digest, superseded_by_spec
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
    held = op.locks.get(key)
    waited = held is not None and held.lock.locked()
    async with identity_lock(op, key):
        if body is not None and (waited or _request_pending(body)):
            # another reconcile ran while this one waited, or a user's request is about to be served: act on the
            # object as it is now, not on an event's copy that may predate the writes that served it already
            body = None
        fresh = body is None  # an event's body may predate a reconcile that ran meanwhile
        if body is None:
            body = await op.kube.run(op.kube.get_workload_identity, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            op.scheduler.forget(key)
            return
        try:
            await _reconcile_locked(op, key, body, fresh)
        except NotFound:
            # the identity, or its whole namespace, went away between the read and a write: nothing is left to
            # act on, and a retry would find the same (an identity left behind in a removed namespace looped here)
            log.info("%s/%s: gone from the API while reconciling; not reconciling it any more", namespace, name)
            op.scheduler.forget(key)
        except ApiError as exc:
            if not namespace_terminating(exc.status, str(exc)):
                raise
            # not an error: the namespace is going away with everything in it; its deletion finalizes the identity
            log.info("%s/%s: namespace %s is terminating; not reconciling it any more", namespace, name, namespace)
            op.scheduler.forget(key)


def _request_pending(body: dict[str, Any]) -> bool:
    """A revoke request, or a renew request the status has not recorded as served."""
    annotations = body["metadata"].get("annotations") or {}
    renew = annotations.get(ANNOTATION_RENEW)
    return bool(annotations.get(ANNOTATION_REVOKE)) or bool(
        renew and renew != (body.get("status") or {}).get("lastRenewRequest"))


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
    fresh: bool  # read from the API under the lock, not an event's copy


async def _reconcile_locked(op: Operator, key: IdentityKey, body: dict[str, Any], fresh: bool = False) -> None:
    """Load, decide, act, report. A first create that meets an existing Secret (ours from before a crash, or a
    stranger's) reads it and decides once more; any later conflict waits a second for the scheduler."""
    resolved = await _load(op, key, body, fresh)
    if resolved is None:
        return
    read_secret = False
    while True:
        state = await _read_state(op, resolved, read_secret)
        decision = decide(state)
        if decision.action == CONFLICT:
            await report_failure(op, body, resolved.status, decision.reason, decision.message)
            op.scheduler.schedule(key, state.now + RETRY_CONFLICT)
            return
        if decision.action != ISSUE:
            await _confirm(op, resolved, state, decision)
            return
        if not await _issue(op, resolved, state, decision):  # written, or refused for good
            return
        if read_secret or state.secret.exists:
            op.scheduler.schedule(key, op.clock.now() + dt.timedelta(seconds=1))
            return
        read_secret = True  # the Secret exists after all: read it and decide again, once


async def _load(op: Operator, key: IdentityKey, body: dict[str, Any], fresh: bool) -> _Resolved | None:
    """Parse and resolve the identity; report its overlaps, bind it to its trust domain and publish its sidecar
    config. None when it cannot go further now (reported, and re-checked later)."""
    status: dict[str, Any] = dict(body.get("status") or {})
    annotations: dict[str, str] = dict(body["metadata"].get("annotations") or {})
    try:
        spec = parse_workload_identity(body)
        runtime = await op.trust.resolve(spec.trust_domain, status.get("trustDomain"), key)
        identity = resolve_identity(spec, runtime.spec, op.default_data_plane)
    except (SpecError, TrustDomainError) as exc:
        reason = exc.reason
        message = str(exc) if isinstance(exc, SpecError) else exc.message
        await report_failure(op, body, status, reason, message)
        op.scheduler.schedule(key, op.clock.now() + RETRY_INVALID)
        return None

    await report_overlaps(op, key, body, spec.service_account, spec.pod_selector, status)
    await op.trust.bind(runtime, key)
    try:
        await publish_sidecar_config(op, body, identity, runtime.spec.bundle_configmap)
    except SpecError as exc:
        await report_failure(op, body, status, exc.reason, str(exc))
        # a config too large cannot shrink by itself: the next spec change (an event) tries again
        unfit = exc.reason in (Reason.SIDECAR_CONFIG_TOO_LARGE, Reason.SIDECAR_CONFIG_REFUSED)
        retry = RETRY_INVALID if unfit else RETRY_CONFLICT
        op.scheduler.schedule(key, op.clock.now() + retry)
        return None
    return _Resolved(key, body, status, annotations, spec, runtime, identity, fresh)


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
    await report_floor(op, body, status, decision.clamped, decision.message if decision.reason ==
                        Reason.RENEWAL_FLOOR else floor_message(identity), now)
    due = iso(secret_renewal_time(state))

    def lags(status: dict[str, Any]) -> bool:
        return (status.get("serialNumber") != state.certificate().serial or not is_ready(status)
                or status.get("renewalTime") != due)

    if lags(status) and not resolved.fresh:
        # the event's body may be older than a reconcile that just recorded this very Secret (a renewal racing an
        # edit): catch up from the status as it is now, or the catch-up repeats that reconcile's Event
        current = await op.kube.run(op.kube.get_workload_identity, namespace, name)
        if current is not None:
            body, status = current, dict(current.get("status") or {})
    if lags(status):
        # status lags the Secret (operator restarted mid-write, recovered from an error, or the renewal point
        # in the spec changed): catch it up, finishing a spec change the restart interrupted
        superseded = superseded_by_spec(status, identity, False, now)
        revoked = await revoke_superseded(op, body, superseded) if superseded is not None else frozenset()
        await op.kube.run(op.kube.patch_workload_identity_status, namespace, name, status_from_secret(
            status, state, decision.message, now, revoked))
        serial, previous = state.certificate().serial, status.get("serialNumber")
        if serial != previous:  # the operator died between the Secret and its Event: nobody was told yet
            reason = Reason.ROTATED if previous else Reason.ISSUED
            await op.post_event(body, "Normal", reason, f"serial {previous or '-'} -> {serial} (recorded after an "
                                                        "operator restart)")
    assert decision.recheck_at is not None
    record_metrics(namespace, name, str(identity.spiffe_id), state, decision.recheck_at)
    op.secret_digests[resolved.key] = secret_digest(state.secret.data)
    op.scheduler.schedule(resolved.key, decision.recheck_at)


async def _issue(op: Operator, resolved: _Resolved, state: IdentityState, decision: Decision) -> bool:
    """Sign a certificate and write the Secret (one replace guarded by its resourceVersion), then report.
    True when the Secret changed or appeared since it was read: nothing was written."""
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
        await report_failure(op, body, status, Reason.INVALID_SECRET,
                    f"the API server refused Secret {resolved.spec.secret_name}: {exc}")
        op.scheduler.schedule(resolved.key, op.clock.now() + RETRY_INVALID)
        return False
    except Conflict:
        return True  # the Secret changed (or exists) since we looked
    metrics.issuance_seconds.observe(time.perf_counter() - started)
    op.secret_digests[resolved.key] = secret_digest({k: v.encode() for k, v in written["stringData"].items()})
    reason = event_reason(decision, had_certificate)
    revoked = await revoke_superseded(op, body, superseded) if superseded is not None else frozenset()
    new_status = issued_status(identity, issuance, status, rotated=had_certificate,
                               ca_fingerprint=runtime.ca.fingerprint, renew_request=annotations.get(ANNOTATION_RENEW),
                               now=now, revoked=revoked)
    await op.kube.run(op.kube.patch_workload_identity_status, namespace, name, new_status)
    await report_floor(op, body, new_status, issuance.clamped, floor_message(identity), now)
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
    metrics.record_identity(namespace, name, str(identity.spiffe_id), cert.not_after.timestamp(),
                            issuance.renewal_time.timestamp())
    op.scheduler.schedule(resolved.key, issuance.renewal_time)
    return False


def _trusted_roots(cas: list[CertificateAuthority]) -> frozenset[bytes]:
    return frozenset(root.public_bytes(serialization.Encoding.DER) for ca in cas for root in ca.roots)


def _time_or_none(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


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
