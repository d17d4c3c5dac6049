"""Reconciling one WorkloadIdentity: read, ask `policy`, write through `kube`. No kopf here.

Called from kopf handlers (create, update, resume), from the renewal scheduler and when a managed Secret changes;
a per-identity lock makes those never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from meshtls.api.constants import (
    ANNOTATION_RENEW,
    ANNOTATION_REVOKE,
    API_VERSION,
    FINALIZER,
    KIND_WORKLOAD_IDENTITY,
    LABEL_IDENTITY,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
)
from meshtls.api.durations import format_duration
from meshtls.api.model import EffectiveIdentity, SpecError, parse_workload_identity, resolve_identity
from meshtls.api.names import sidecar_configmap_name
from meshtls.api.objects import ABSENT
from meshtls.controller import metrics
from meshtls.controller.scheduler import Key, RenewalScheduler
from meshtls.controller.trust import TrustDomainError, TrustDomainRuntime, TrustDomains
from meshtls.dataplane.layout import CONFIG_FILE
from meshtls.injection.render import check_publishable, injection_target, render_sidecar_config
from meshtls.injection.targets import PodSelectionIndex, TargetIndex
from meshtls.kube import Conflict, Kube
from meshtls.kube.client import ApiError, NotFound
from meshtls.pki import CertificateAuthority, RevocationReason, RevokedCertificate, load_certificates
from meshtls.policy.ca_rotation import reissue_delay
from meshtls.policy.certificate import dns_names_of
from meshtls.policy.clock import Clock
from meshtls.policy.issuance import (
    Superseded,
    condition,
    failed_status,
    floor_condition,
    iso,
    issue_for,
    issued_status,
    merge_conditions,
    overlap_condition,
    revocations_by_issuer,
    secret_body,
    secret_digest,
    superseded_by_spec,
    tracked_serials,
)
from meshtls.policy.namespaces import namespace_terminating
from meshtls.policy.peering import outranked_by_live_peer
from meshtls.policy.triggers import CONFLICT, ISSUE, IdentityState, decide, event_reason, secret_renewal_time

log = logging.getLogger("meshtls.identity")
RETRY_INVALID = dt.timedelta(seconds=60)
RETRY_CONFLICT = dt.timedelta(seconds=30)
RETRY_ERROR = dt.timedelta(seconds=5)
TRUST_DOMAIN_KEY = ""  # scheduler keys ("", name) are trust domains: no namespace is empty
MAX_REISSUE_SPREAD = dt.timedelta(minutes=5)
PAUSED_RECHECK = dt.timedelta(seconds=5)
PEERING_POLL = 2.0  # seconds


@dataclass
class _HeldLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@contextlib.asynccontextmanager
async def identity_lock(op: Operator, key: Key) -> AsyncIterator[None]:
    """One reconcile per identity at a time; the lock exists only while in use (ten thousand idle identities
    hold none)."""
    held = op.locks.setdefault(key, _HeldLock())
    held.users += 1
    try:
        async with held.lock:
            yield
    finally:
        held.users -= 1
        if held.users == 0:
            op.locks.pop(key, None)


@dataclass
class Operator:
    """Everything the handlers share, made once at start-up."""

    kube: Kube
    clock: Clock
    trust: TrustDomains
    scheduler: RenewalScheduler = field(init=False)
    locks: dict[Key, _HeldLock] = field(default_factory=dict)  # only while someone holds or waits for one
    targets: TargetIndex = field(default_factory=TargetIndex)  # identities with a sidecar, for the webhook
    rendered: dict[Key, str] = field(default_factory=dict)  # sidecar config last written, per identity
    selection: PodSelectionIndex = field(default_factory=PodSelectionIndex)  # every identity's pods, for overlaps
    selection_known: set[str] = field(default_factory=set)  # namespaces whose identities are all in `selection`
    selection_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    secret_digests: dict[Key, str] = field(default_factory=dict)  # content of the Secret last written or verified
    handled: dict[Key, tuple[Any, ...]] = field(default_factory=dict)  # last event fingerprint reconciled
    background: set[asyncio.Task[None]] = field(default_factory=set)
    paused: bool = False  # kopf peering: a live peer with a higher priority acts instead of this replica

    def __post_init__(self) -> None:
        self.scheduler = RenewalScheduler(self.clock, self.reconcile_key)

    async def reconcile_key(self, key: Key) -> None:
        if self.paused:  # a peer with a higher priority acts; look again later, it may be gone by then
            self.scheduler.schedule(key, self.clock.now() + PAUSED_RECHECK)
            return
        if key[0] == TRUST_DOMAIN_KEY:  # a trust domain's CA rotation timer shares the heap
            await reconcile_trust_domain_named(self, key[1])
            return
        await reconcile(self, *key)

    async def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body.get("metadata", {})
        involved = {"apiVersion": body.get("apiVersion", API_VERSION), "kind": body.get("kind", KIND_WORKLOAD_IDENTITY),
                    "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")}
        try:
            await self.kube.run(self.kube.post_event, involved, type_, reason, message)
        except Exception as exc:  # an Event is information; losing one must not fail the work it describes
            # a namespace being deleted takes no Events: expected, not worth a warning
            level = logging.INFO if isinstance(exc, ApiError) and namespace_terminating(exc.status, str(exc)) \
                else logging.WARNING
            log.log(level, "could not post Event %s for %s/%s: %s", reason, meta.get("namespace"), meta.get("name"),
                    exc)


async def reconcile_trust_domain(op: Operator, body: dict[str, Any]) -> None:
    """Load or create the trust domain's CA, move its rotation forward, publish bundles, report.

    An unusable trust domain (missing or invalid CA, squatted state Secret) is an expected condition: reported once
    per change (condition + one Warning Event, no traceback), re-checked every two resyncs (60 s), and at once when
    a Secret it reads changes (handlers.trust_watch)."""
    name = body["metadata"]["name"]
    status = dict(body.get("status") or {})
    defaults_before = op.trust.default_conflict()
    try:
        runtime, changes = await op.trust.ensure(body)
    except TrustDomainError as exc:
        await _report_unusable_trust_domain(op, body, status, exc)
        op.scheduler.schedule((TRUST_DOMAIN_KEY, name), op.clock.now() + op.trust.resync * 2)
        return
    runtime.last_status = status
    await after_trust_domain_change(op, runtime, changes, body)
    if op.trust.default_conflict() != defaults_before:  # the other TrustDomains marked default say so too
        for other in set(defaults_before) | set(op.trust.default_conflict()):
            if other != name:
                op.scheduler.schedule((TRUST_DOMAIN_KEY, other), op.clock.now())


async def _report_unusable_trust_domain(op: Operator, body: dict[str, Any], status: dict[str, Any],
                                        exc: TrustDomainError) -> None:
    name = body["metadata"]["name"]
    patch = op.trust.failed_status(status, exc.reason, exc.message)
    if patch is None:
        return  # already reported: no write, no Event
    log.warning("trust domain %s not usable: %s: %s", name, exc.reason, exc.message)
    try:
        await op.kube.run(op.kube.patch_trust_domain_status, name, patch)
    except NotFound:
        return
    await op.post_event({**body, "kind": "TrustDomain"}, "Warning", exc.reason, exc.message)


async def reconcile_trust_domain_named(op: Operator, name: str) -> None:
    """The trust domain's timer, or a Secret/ConfigMap it reads changed: reconcile it from a fresh read."""
    body = await op.kube.run(op.kube.get_trust_domain, name)
    if body is None:
        await trust_domain_gone(op, name)
        return
    await reconcile_trust_domain(op, body)


async def trust_domain_gone(op: Operator, name: str) -> None:
    """Deleted: nothing is signed under it from now on; its identities re-check (and report it); its roots leave
    the bundles other trust domains share."""
    op.scheduler.forget((TRUST_DOMAIN_KEY, name))
    runtime = op.trust.forget(name)
    if runtime is None:
        return
    log.info("trust domain %s deleted: %d identities lose their issuer", name, len(runtime.identities))
    now = op.clock.now()
    for key in sorted(runtime.identities):
        op.scheduler.schedule(key, now)
    await op.trust.withdraw(runtime)


async def after_trust_domain_change(op: Operator, runtime: TrustDomainRuntime, changes: list[tuple[str, str]],
                                    body: dict[str, Any] | None) -> None:
    await op.trust.publish(runtime)
    await op.trust.write_status(runtime)
    ref = body or {"apiVersion": API_VERSION, "kind": "TrustDomain", "metadata": {"name": runtime.name}}
    for reason, message in changes:
        await op.post_event({**ref, "kind": "TrustDomain"}, "Normal", reason, message)
    for reason, message in op.trust.new_problems(runtime):
        log.warning("trust domain %s: %s: %s", runtime.name, reason, message)
        await op.post_event({**ref, "kind": "TrustDomain"}, "Warning", reason, message)
        if reason == "BundleConflict":
            await _warn_identities_of_conflicts(op, runtime)
    if any(reason == "CARotated" for reason, _ in changes):
        # every identity re-issues from the new CA, spread so that thousands do not sign in the same second
        spread = min(runtime.spec.policy.default_ttl / 4, MAX_REISSUE_SPREAD)
        now = op.clock.now()
        for key in list(runtime.identities):
            op.scheduler.schedule(key, now + reissue_delay(f"{key[0]}/{key[1]}", spread))
    now = op.clock.now()
    for key in op.trust.take_waiting(runtime.name):  # identities that waited for this trust domain to work
        op.scheduler.schedule(key, now)
    next_check = op.trust.next_phase_check(runtime)
    if next_check is not None:
        op.scheduler.schedule((TRUST_DOMAIN_KEY, runtime.name), next_check)


async def _warn_identities_of_conflicts(op: Operator, runtime: TrustDomainRuntime) -> None:
    """Identities whose namespace has no bundle say so too: their peers there cannot verify them."""
    name = runtime.spec.bundle_configmap
    for namespace, identity in sorted(runtime.identities):
        problem = op.trust.bundle_conflicts.get((namespace, name))
        if problem is not None:
            await op.post_event({"apiVersion": API_VERSION, "kind": KIND_WORKLOAD_IDENTITY,
                                 "metadata": {"name": identity, "namespace": namespace}}, "Warning",
                                "BundleConflict", f"trust domain {runtime.name}: {problem}")


async def follow_peering(op: Operator, name: str, priority: int, namespaces: list[str]) -> None:
    """Keep `op.paused` in step with kopf's peering: kopf pauses only its own watchers, not meshtls's timers."""
    while True:
        try:
            now = op.clock.now()
            scopes: list[str | None] = list(namespaces) if namespaces else [None]  # None: the ClusterKopfPeering
            statuses = [await op.kube.run(op.kube.read_peering_status, name, ns) for ns in scopes]
            paused = any(outranked_by_live_peer(status, priority, now) for status in statuses)
            if paused != op.paused:
                log.info("peering %s: %s", name, "standing by for a higher-priority peer" if paused else "acting")
                op.paused = paused
                if not paused:
                    op.handled.clear()  # kopf re-lists on resume: reconcile everything once
        except Exception as exc:
            log.warning("reading peering %s failed: %s", name, exc)
        await asyncio.sleep(PEERING_POLL)


def _identity_ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion", API_VERSION), "kind": body.get("kind", KIND_WORKLOAD_IDENTITY),
            "name": meta["name"], "uid": meta["uid"]}


def _event_fingerprint(meta: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an event worth a reconcile: a spec change (generation) or a renew/revoke request.

    Our own status and finalizer writes come back as events too; they change neither, so they cost nothing.
    """
    annotations = meta.get("annotations") or {}
    return (meta.get("uid"), meta.get("generation"), annotations.get(ANNOTATION_RENEW),
            annotations.get(ANNOTATION_REVOKE))


async def on_identity_event(op: Operator, event_type: str, body: dict[str, Any]) -> None:
    meta = body.get("metadata") or {}
    key = (str(meta.get("namespace")), str(meta.get("name")))
    finalizers = list(meta.get("finalizers") or [])
    if event_type == "DELETED":
        op.handled.pop(key, None)
        op.scheduler.forget(key)
        op.targets.remove(*key)
        op.secret_digests.pop(key, None)
        _recheck_overlaps(op, key[0], op.selection.remove(*key))
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
                _later(op, RETRY_ERROR, _retry_deletion(op, key))
            except Exception as exc:  # kopf does not retry event handlers: try again with a fresh read
                log.warning("revoking %s/%s on deletion failed (%s); retrying in %.0f s", *key, exc,
                            RETRY_ERROR.total_seconds())
                _later(op, RETRY_ERROR, _retry_deletion(op, key))
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


def _later(op: Operator, delay: dt.timedelta, work: Coroutine[Any, Any, None]) -> None:
    async def run() -> None:
        await asyncio.sleep(delay.total_seconds())
        await work

    task = asyncio.create_task(run())
    op.background.add(task)
    task.add_done_callback(op.background.discard)


async def _retry_deletion(op: Operator, key: Key) -> None:
    body = await op.kube.run(op.kube.get_workload_identity, *key)
    if body is not None:
        await on_identity_event(op, "MODIFIED", body)


async def reconcile(op: Operator, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
    key = (namespace, name)
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
            await _reconcile_locked(op, key, body, fresh=fresh)
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


def _recheck_overlaps(op: Operator, namespace: str, names: set[str]) -> None:
    """Identities whose set of overlapping identities changed report it again, soon."""
    for other in names:
        op.scheduler.schedule((namespace, other), op.clock.now())


async def _reconcile_locked(op: Operator, key: Key, body: dict[str, Any], read_secret: bool = False,
                            fresh: bool = False) -> None:
    namespace, name = key
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
        return

    await _report_overlaps(op, key, body, spec.service_account, spec.pod_selector, status)
    await op.trust.bind(runtime, key)
    try:
        await _publish_sidecar_config(op, body, identity, runtime.spec.bundle_configmap)
    except SpecError as exc:
        await _fail(op, body, status, exc.reason, str(exc))
        # a config too large cannot shrink by itself: the next spec change (an event) tries again
        retry = RETRY_INVALID if exc.reason in ("SidecarConfigTooLarge", "SidecarConfigRefused") else RETRY_CONFLICT
        op.scheduler.schedule(key, op.clock.now() + retry)
        return
    # A brand-new identity has no Secret yet: create it without reading first. If one exists after all (ours from
    # before a crash, or a stranger's), the create fails with a conflict and we read and decide again below.
    never_reconciled = not status.get("serialNumber") and not status.get("conditions")
    if never_reconciled and not read_secret:
        secret = ABSENT
    else:
        secret = await op.kube.run(op.kube.read_secret, namespace, spec.secret_name)
    now = op.clock.now()
    generation = body["metadata"].get("generation")
    state = IdentityState(
        identity=identity, uid=body["metadata"]["uid"], annotations=annotations,
        handled_renew_request=status.get("lastRenewRequest"), secret=secret,
        ca_key_id=runtime.ca_key_id, ca_not_after=runtime.ca.not_after, now=now,
        issued_serial=status.get("serialNumber"), issued_spiffe_id=status.get("spiffeID"),
        issued_secret_name=status.get("secretName"),
        issued_not_before=_time_or_none(status.get("notBefore")),
        issued_serials=frozenset(str(e.get("serial")) for e in status.get("activeSerials") or []),
        trusted_cas=tuple(ca.certificate for ca in runtime.trusted), trusted_roots=_trusted_roots(runtime.trusted),
        generation=int(generation) if generation else None,
    )
    decision = decide(state)
    if decision.action == CONFLICT:
        await _fail(op, body, status, decision.reason, decision.message)
        op.scheduler.schedule(key, now + RETRY_CONFLICT)
        return
    if decision.action != ISSUE:
        await _report_floor(op, body, status, decision.clamped, decision.message if decision.reason ==
                            "RenewalFloor" else _floor_message(identity), now)
        due = iso(secret_renewal_time(state))

        def lags(status: dict[str, Any]) -> bool:
            return (status.get("serialNumber") != state.certificate().serial or not _is_ready(status)
                    or status.get("renewalTime") != due)

        if lags(status) and not fresh:
            # the event's body may be older than a reconcile that just recorded this very Secret (a renewal racing
            # an edit): catch up from the status as it is now, or the catch-up repeats that reconcile's Event
            current = await op.kube.run(op.kube.get_workload_identity, namespace, name)
            if current is not None:
                body, status = current, dict(current.get("status") or {})
        if lags(status):
            # status lags the Secret (operator restarted mid-write, recovered from an error, or the renewal point
            # in the spec changed): catch it up, finishing a spec change the restart interrupted
            superseded = superseded_by_spec(status, identity, False, now)
            revoked = await _revoke_superseded(op, body, superseded) if superseded is not None else frozenset()
            await op.kube.run(op.kube.patch_workload_identity_status, namespace, name, _status_from_secret(
                status, state, decision.message, now, revoked))
            serial, previous = state.certificate().serial, status.get("serialNumber")
            if serial != previous:  # the operator died between the Secret and its Event: nobody was told yet
                reason = "Rotated" if previous else "Issued"
                await op.post_event(body, "Normal", reason, f"serial {previous or '-'} -> {serial} (recorded after an "
                                                            "operator restart)")
        assert decision.recheck_at is not None
        _record_metrics(namespace, name, str(identity.spiffe_id), state, decision.recheck_at)
        op.secret_digests[key] = secret_digest(secret.data)
        op.scheduler.schedule(key, decision.recheck_at)
        return

    previous_serial = status.get("serialNumber")
    had_certificate = bool(previous_serial) or (secret.exists and state.certificate().certificate is not None)
    old_cert = state.certificate().certificate if secret.exists else None
    dns_changed = old_cert is not None and sorted(dns_names_of(old_cert)) != sorted(spec.dns_names)
    superseded = superseded_by_spec(status, identity, dns_changed, now)
    if decision.revoke_current:
        await _revoke_current(op, runtime, state, annotations.get(ANNOTATION_REVOKE) or "")
    started = time.perf_counter()
    issuance = issue_for(identity, runtime.ca, now, on_schedule=decision.on_schedule)
    written = secret_body(identity, issuance, _identity_ref(body), int(generation) if generation else None)
    try:
        await op.kube.run(op.kube.write_secret, written, secret)
    except ApiError as exc:
        if exc.status != 422:
            raise
        # the API server refuses the Secret itself (a name or label it cannot take): retrying cannot help
        await _fail(op, body, status, "InvalidSecret", f"the API server refused Secret {spec.secret_name}: {exc}")
        op.scheduler.schedule(key, op.clock.now() + RETRY_INVALID)
        return
    except Conflict:
        # the Secret changed (or exists) since we looked: decide again with what is there now
        if not secret.exists and not read_secret:
            await _reconcile_locked(op, key, body, read_secret=True, fresh=fresh)
        else:
            op.scheduler.schedule(key, op.clock.now() + dt.timedelta(seconds=1))
        return
    metrics.issuance_seconds.observe(time.perf_counter() - started)
    op.secret_digests[key] = secret_digest({k: v.encode() for k, v in written["stringData"].items()})
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
    if reason == "Issued":
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
    op.scheduler.schedule(key, issuance.renewal_time)


async def _publish_sidecar_config(op: Operator, body: dict[str, Any], identity: EffectiveIdentity,
                                  bundle_config_map: str) -> None:
    """Identities with inbound or outbound routes get a rendered proxy.yaml and are offered to the injector."""
    spec = identity.spec
    key = (spec.namespace, spec.name)
    if not spec.inbound and not spec.outbound:
        op.targets.remove(spec.namespace, spec.name)
        return
    text = render_sidecar_config(identity).to_yaml()
    check_publishable(identity, text)
    if op.rendered.get(key) != text:
        name = sidecar_configmap_name(spec.name)
        current = await op.kube.run(op.kube.read_configmap, spec.namespace, name)
        if current is not None and current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise SpecError("spec", f"ConfigMap {name} exists and is not managed by meshtls", reason="ConfigConflict")
        labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_IDENTITY: spec.name}
        if current is None or current["data"] != {CONFIG_FILE: text} or any(
                current["labels"].get(k) != v for k, v in labels.items()):
            try:
                await op.kube.run(op.kube.write_configmap, spec.namespace, name, {CONFIG_FILE: text}, labels, current,
                                  _identity_ref(body))
            except ApiError as exc:
                if exc.status not in (413, 422):
                    raise
                # too large or otherwise refused as a whole: the same write can only fail again
                raise SpecError("spec", f"the API server refused sidecar ConfigMap {name}: {exc}",
                                reason="SidecarConfigRefused") from None
        op.rendered[key] = text
    op.targets.put(spec.namespace, injection_target(identity, bundle_config_map))


async def _revoke_superseded(op: Operator, body: dict[str, Any], superseded: Superseded) -> frozenset[str]:
    """Revoke what a spec change left valid, each serial on the CRL of the trust domain that issued it, and remove
    the Secret under the old name (only ours). Returns the serials dealt with."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    now = op.clock.now()
    done: set[str] = set()
    told: list[str] = []
    for trust_domain, serials in superseded.serials.items():
        runtime, (why_reason, why) = await _issuer_for_revocation(op, trust_domain)
        if runtime is None:
            if why_reason == "TrustDomainGone":
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
            if await _trust_domain_gone(op, trust_domain):
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
    await op.post_event(body, "Normal", "Superseded", message)
    return frozenset(done)


async def _trust_domain_gone(op: Operator, name: str) -> bool:
    """A revocation failed: only the TrustDomain object being gone (or going) makes that final, not an error."""
    try:
        body = await op.kube.run(op.kube.get_trust_domain, name)
    except Exception:
        return False
    return body is None or bool(body.get("metadata", {}).get("deletionTimestamp"))


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
        await op.post_event(body, "Warning", "RenewalFloor", message)


async def _know_namespace(op: Operator, namespace: str) -> None:
    """Index every identity of a namespace before judging overlaps there: after a restart the first identity
    reconciled must not report "no overlap" only because its neighbours have not been seen yet."""
    if namespace in op.selection_known:
        return
    async with op.selection_lock:  # a restart reconciles a namespace's identities together: one list, not N
        if namespace not in op.selection_known:
            await _index_namespace(op, namespace)


async def _index_namespace(op: Operator, namespace: str) -> None:
    for other in await op.kube.run(op.kube.list_workload_identities, namespace):
        meta, spec = other.get("metadata") or {}, other.get("spec") or {}
        sa = spec.get("serviceAccountName") if isinstance(spec, dict) else None
        if meta.get("deletionTimestamp") or not isinstance(sa, str):
            continue
        labels = (spec.get("podSelector") or {}).get("matchLabels") or {}
        if isinstance(labels, dict):
            op.selection.put(namespace, str(meta.get("name")), sa, {str(k): str(v) for k, v in labels.items()})
    op.selection_known.add(namespace)


async def _report_overlaps(op: Operator, key: Key, body: dict[str, Any], service_account: str,
                           selector: dict[str, str], status: dict[str, Any]) -> None:
    await _know_namespace(op, key[0])
    _recheck_overlaps(op, key[0], op.selection.put(key[0], key[1], service_account, selector))
    others = op.selection.overlapping(*key)
    changed = overlap_condition(status.get("conditions"), service_account, others, op.clock.now())
    if changed is None:
        return
    status["conditions"] = merge_conditions(status.get("conditions"), [changed])
    await op.kube.run(op.kube.patch_workload_identity_status, key[0], key[1], {"conditions": status["conditions"]})
    if others:
        await op.post_event(body, "Warning", "Overlapping", changed["message"])


def _trusted_roots(cas: list[CertificateAuthority]) -> frozenset[bytes]:
    return frozenset(root.public_bytes(serialization.Encoding.DER) for ca in cas for root in ca.roots)


def _time_or_none(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _is_ready(status: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


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
            condition("Ready", True, "Issued", message, now),
            condition("Issuing", False, "Issued", "certificate is up to date", now),
        ]),
    }


async def _fail(op: Operator, body: dict[str, Any], status: dict[str, Any], reason: str, message: str) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
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


async def _issuer_for_revocation(op: Operator, name: str | None
                                 ) -> tuple[TrustDomainRuntime | None, tuple[str, str]]:
    """The trust domain that signed a deleted identity's certificates, or None with (Event reason, why)."""
    try:
        if name:
            runtime = await op.trust.get_existing(name)
            # not loaded (yet) but there: load it; gone: get() says so
            return runtime or await op.trust.get(name), ("", "")
        return await op.trust.resolve(None, None), ("", "")
    except TrustDomainError as exc:
        log.info("revoking under trust domain %s: %s", name or "(default)", exc.message)
        reason = "TrustDomainGone" if exc.reason == "UnknownTrustDomain" else "RevocationSkipped"
        return None, (reason, exc.message)


async def revoke_on_delete(op: Operator, body: dict[str, Any]) -> None:
    """Every still-valid serial of the identity goes on the CRL of the trust domain that issued it, published
    everywhere; then the Secret goes."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    key = (namespace, name)
    op.scheduler.forget(key)
    async with identity_lock(op, key):
        status = dict(body.get("status") or {})
        spec_td = (body.get("spec") or {}).get("trustDomain") or status.get("trustDomain")
        secret_name = (body.get("spec") or {}).get("secretName") or f"{name}-mtls"
        secret = await op.kube.run(op.kube.read_secret, namespace, secret_name)
        owned = secret.exists and secret.owned_by(body["metadata"]["uid"])
        now = op.clock.now()
        by_issuer = revocations_by_issuer(status, str(spec_td or ""), now)
        if owned and secret.data.get("tls.crt"):
            try:  # the Secret's own certificate, in case the status never recorded it (a crash mid-issuance)
                cert = load_certificates(secret.data["tls.crt"])[0]
                serial = format(cert.serial_number, "x")
                if cert.not_valid_after_utc > now and not any(serial == s for group in by_issuer.values()
                                                              for s, _ in group):
                    issuer = secret.labels.get(LABEL_TRUST_DOMAIN) or str(spec_td or "")
                    by_issuer.setdefault(issuer, []).append((serial, cert.not_valid_after_utc))
            except Exception:
                pass
        published: list[str] = []
        gone: list[tuple[str, str]] = []  # (Event reason, why) per trust domain that can no longer sign a CRL
        for trust_domain, serials in by_issuer.items():
            listed = ", ".join(s for s, _ in serials)
            runtime, why = await _issuer_for_revocation(op, trust_domain or None)
            if runtime is None:
                # nothing can publish a CRL for a trust domain that no longer exists: holding the finalizer helps nobody
                gone.append(why)
                published.append(f"{listed} not put on any CRL ({why[1]})")
                continue
            try:
                await op.trust.revoke(runtime, [RevokedCertificate(int(serial, 16), now, not_after,
                                                                   RevocationReason.CESSATION_OF_OPERATION)
                                                for serial, not_after in serials])
            except Exception:
                if not await _trust_domain_gone(op, trust_domain):
                    raise  # retried: the serials must reach the CRL before the finalizer goes
                log.info("%s/%s deleted; trust domain %s was deleted too: no CRL to publish", namespace, name,
                         trust_domain)
                gone.append(("TrustDomainGone", f"trust domain {trust_domain} was deleted"))
                published.append(f"{listed} not put on any CRL (trust domain {trust_domain} was deleted)")
                continue
            published.append(f"{listed} on the CRL of {runtime.name} (#{runtime.crl_number})")
        await op.trust.unbind(key)
        if owned and secret.uid:
            await op.kube.run(op.kube.delete_secret, namespace, secret_name, secret.uid)
        secret_note = f"Secret {secret_name} {'deleted' if owned else 'left (not ours)'}"
        if gone:
            await op.post_event(body, "Warning", gone[0][0], f"revoked serial(s) {'; '.join(published)}: no CA is "
                                                            f"left to sign a CRL for some; {secret_note}")
        else:
            await op.post_event(body, "Normal", "Revoked",
                                f"revoked serial(s) {'; '.join(published) or 'none'}; {secret_note}")
        metrics.forget_identity(namespace, name, str(status.get("spiffeID", "")))
        op.rendered.pop(key, None)
        op.secret_digests.pop(key, None)
        op.targets.remove(namespace, name)
        _recheck_overlaps(op, namespace, op.selection.remove(namespace, name))
