"""Reconciling one TrustDomain: load or create its CA, move its rotation forward, publish bundles, report; and what
its identities are told when it changes or goes. No kopf here."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from meshtls.api.constants import API_VERSION, KIND_WORKLOAD_IDENTITY
from meshtls.api.reasons import Reason
from meshtls.controller.runtime import Operator
from meshtls.controller.scheduler import TrustDomainKey
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.kube.client import NotFound
from meshtls.policy.ca_rotation import reissue_delay

log = logging.getLogger("meshtls.identity")
MAX_REISSUE_SPREAD = dt.timedelta(minutes=5)


async def reconcile_trust_domain(op: Operator, body: dict[str, Any]) -> None:
    """Load or create the trust domain's CA, move its rotation forward, publish bundles, report.

    An unusable trust domain (missing or invalid CA, squatted state Secret) is an expected condition: reported once
    per change (condition + one Warning Event, no traceback), re-checked every two resyncs (60 s), and at once when
    a Secret it reads changes (handlers.trust_watch)."""
    name = body["metadata"]["name"]
    status = dict(body.get("status") or {})
    defaults_before = op.trust.default_conflict()
    known = op.trust.runtime(name)
    workload_api_before = known.spec.workload_api if known else None
    try:
        runtime, changes = await op.trust.ensure(body)
    except TrustDomainError as exc:
        await _report_unusable_trust_domain(op, body, status, exc)
        op.scheduler.schedule(TrustDomainKey(name), op.clock.now() + op.trust.resync * 2)
        return
    runtime.last_status = status
    await after_trust_domain_change(op, runtime, changes, body)
    if workload_api_before is not None and runtime.spec.workload_api != workload_api_before:
        # its identities' pods get (or lose) the Workload API socket: they are offered to the injector anew
        for key in sorted(runtime.identities):
            op.scheduler.schedule(key, op.clock.now())
    if op.trust.default_conflict() != defaults_before:  # the other TrustDomains marked default say so too
        for other in set(defaults_before) | set(op.trust.default_conflict()):
            if other != name:
                op.scheduler.schedule(TrustDomainKey(other), op.clock.now())


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
    op.scheduler.forget(TrustDomainKey(name))
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
        if reason == Reason.BUNDLE_CONFLICT:
            await _warn_identities_of_conflicts(op, runtime)
    if any(reason == Reason.CA_ROTATED for reason, _ in changes):
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
        op.scheduler.schedule(TrustDomainKey(runtime.name), next_check)


async def _warn_identities_of_conflicts(op: Operator, runtime: TrustDomainRuntime) -> None:
    """Identities whose namespace has no bundle say so too: their peers there cannot verify them."""
    name = runtime.spec.bundle_configmap
    for namespace, identity in sorted(runtime.identities):
        problem = op.trust.bundle_conflicts.get((namespace, name))
        if problem is not None:
            await op.post_event({"apiVersion": API_VERSION, "kind": KIND_WORKLOAD_IDENTITY,
                                 "metadata": {"name": identity, "namespace": namespace}}, "Warning",
                                Reason.BUNDLE_CONFLICT, f"trust domain {runtime.name}: {problem}")
