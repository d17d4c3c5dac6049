"""What reacts to what: kopf decorators only. The work lives in `meshtls.controller`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from typing import Any

import kopf

from meshtls.api.constants import (
    GROUP,
    LABEL_BUNDLE,
    LABEL_IDENTITY,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    TRUST_DOMAINS,
    VERSION,
)
from meshtls.api.model import DataPlane
from meshtls.controller import metrics
from meshtls.controller.runtime import Operator, follow_peering
from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.trust.registry import RESYNC, TrustDomains
from meshtls.controller.trust_domains import reconcile_trust_domain, trust_domain_gone
from meshtls.controller.trust_watch import follow_trust_secrets, on_bundle_configmap
from meshtls.controller.watching import follow_identities_and_secrets
from meshtls.injection.target import InjectionOptions
from meshtls.kube import connect
from meshtls.kube.queries import default_holder, run_heartbeat
from meshtls.operator.settings import OPTIONS
from meshtls.policy.clock import SystemClock

log = logging.getLogger("meshtls.operator")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own finalizer name, unused: TrustDomains have no deletion handler (their DELETED event arrives raw);
    # identities carry meshtls's own (revoke on delete)
    settings.persistence.finalizer = f"{GROUP}/kopf"
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's would double them
    # one watch for both kinds of ConfigMap meshtls writes (sidecar configs, trust bundles): kopf ANDs the selectors
    # set for one resource, so each handler below filters on its own label
    settings.watching.label_selectors["", "v1", "configmaps"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 16
    if OPTIONS.peering:
        settings.peering.name = OPTIONS.peering
        settings.peering.priority = OPTIONS.priority
        settings.peering.standalone = False
        settings.peering.mandatory = True
        settings.peering.lifetime = OPTIONS.peering_lifetime
    else:
        settings.peering.standalone = True
    kube = connect(OPTIONS.kubeconfig)
    kube.on_request = metrics.request_counter(OPTIONS.operator_namespace)
    clock = SystemClock()
    # how often a trust domain re-reads what it does not watch (federated bundles); tests shorten it
    resync = dt.timedelta(seconds=float(os.environ.get("MESHTLS_TRUST_RESYNC_SECONDS") or RESYNC.total_seconds()))
    op = Operator(kube=kube, clock=clock, trust=TrustDomains(kube, clock, OPTIONS.operator_namespace, resync,
                                                               OPTIONS.namespaces),
                  default_data_plane=DataPlane(OPTIONS.default_data_plane))
    memo.op = op
    if OPTIONS.peering:
        op.set_paused(True)  # as kopf's own watchers: nothing is acted on before peering says this replica acts
    memo.scheduler_task = asyncio.create_task(op.scheduler.run())
    # identities and their Secrets are watched outside kopf (its per-event machinery cost more than an issuance)
    memo.watch_task = asyncio.create_task(follow_identities_and_secrets(op, OPTIONS.namespaces))
    memo.trust_watch_task = asyncio.create_task(follow_trust_secrets(op, OPTIONS.operator_namespace))
    if OPTIONS.peering:
        memo.peering_task = asyncio.create_task(follow_peering(op, OPTIONS.peering, OPTIONS.priority,
                                                               OPTIONS.namespaces))
    # a Lease renewed every 10 s: `meshtls check` tells a live operator from a dead one without reaching its pod
    memo.heartbeat_task = asyncio.create_task(run_heartbeat(kube, OPTIONS.operator_namespace, default_holder()))
    if OPTIONS.webhook_port:
        from meshtls.injection.webhook import InjectionWebhook  # aiohttp's server only when the webhook is on

        webhook = InjectionWebhook(kube, op.targets, OPTIONS, InjectionOptions(image=OPTIONS.sidecar_image),
                                   paused=lambda: op.paused)
        await webhook.start(clock)
        memo.webhook = webhook
    if OPTIONS.metrics_port:
        metrics.serve(OPTIONS.metrics_port)
    log.info("meshtls operator started (operator namespace %s, %s)", OPTIONS.operator_namespace,
             ", ".join(OPTIONS.namespaces) if OPTIONS.namespaces else "all namespaces")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for name in ("scheduler_task", "peering_task", "trust_watch_task", "watch_task"):
        task = memo.get(name)
        if task is not None:
            task.cancel()
    heartbeat = memo.get("heartbeat_task")
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat  # releases the Lease: `meshtls check` reports the stop at once
    webhook = memo.get("webhook")
    if webhook is not None:
        await webhook.stop()


# --- TrustDomains ------------------------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, TRUST_DOMAINS)
@kopf.on.create(GROUP, VERSION, TRUST_DOMAINS)
@kopf.on.update(GROUP, VERSION, TRUST_DOMAINS)
async def trust_domain_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await reconcile_trust_domain(memo.op, dict(body))


# TrustDomains carry no finalizer, so kopf's deletion handlers may never run: the raw DELETED event is what says so
@kopf.on.event(GROUP, VERSION, TRUST_DOMAINS)
async def trust_domain_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op: Operator | None = memo.get("op")
    if op is None or event.get("type") != "DELETED":
        return
    await trust_domain_gone(op, str(event["object"]["metadata"]["name"]))


# --- WorkloadIdentities and the Secrets meshtls manages: watched outside kopf (controller/watching.py) ----------
# kopf's create/update/resume machinery would add two writes per issuance (its finalizer and its last-handled
# annotation), and its per-event work cost more CPU than an issuance; identities only need "this object changed",
# so reconcile() decides from the whole object each time. A managed Secret deleted or tampered with is repaired.


def _identity_object(event: kopf.RawEvent, memo: kopf.Memo) -> tuple[Operator, dict[str, Any], IdentityKey] | None:
    """The operator, the object and the identity its meshtls.dev/identity label names (None before start-up)."""
    op: Operator | None = memo.get("op")
    if op is None:
        return None
    obj: dict[str, Any] = dict(event["object"])
    meta = obj.get("metadata", {})
    return op, obj, IdentityKey(str(meta.get("namespace")), str(meta.get("labels", {}).get(LABEL_IDENTITY)))


# --- sidecar ConfigMaps meshtls renders: restored when edited or deleted ----------------------------------------


@kopf.on.event("", "v1", "configmaps", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_IDENTITY: kopf.PRESENT})
async def managed_configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    if (found := _identity_object(event, memo)) is None:
        return
    op, obj, key = found
    written = op.rendered.get(key)
    if written is None:
        return  # not one meshtls rendered in this run (a bundle, or before the identity's first reconcile)
    if event["type"] == "DELETED" or dict(obj.get("data") or {}) != written:
        op.rendered.pop(key, None)  # the cache must not hide the change: the next reconcile writes it again
        op.scheduler.schedule(key, op.clock.now())


# --- trust bundle ConfigMaps: restored when deleted or changed (judged by content) -----------------------------


@kopf.on.event("", "v1", "configmaps", labels={LABEL_BUNDLE: "true"})
async def bundle_configmap_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    op: Operator | None = memo.get("op")
    if op is None or op.paused:
        return
    obj: dict[str, Any] = dict(event["object"])
    meta = obj.get("metadata", {})
    await on_bundle_configmap(op, str(event.get("type") or ""), str(meta.get("namespace")), str(meta.get("name")),
                              dict(obj.get("data") or {}), str(meta.get("resourceVersion") or ""))


@kopf.on.probe(id="scheduled")
def scheduled_identities(memo: kopf.Memo, **_: Any) -> int:
    op: Operator | None = memo.get("op")
    return len(op.scheduler) if op else 0
