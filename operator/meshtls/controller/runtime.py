"""What every part of the controller shares: the `Operator` made once at start-up, the per-identity locks, Events,
following kopf's peering, and work for later. No kopf here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from meshtls.api.constants import API_VERSION, KIND_WORKLOAD_IDENTITY
from meshtls.api.model import DEFAULT_DATA_PLANE, DataPlane
from meshtls.controller.scheduler import IdentityKey, Key, RenewalScheduler, TrustDomainKey
from meshtls.controller.trust.registry import TrustDomains
from meshtls.injection.targets import PodSelectionIndex, TargetIndex
from meshtls.kube import Kube
from meshtls.kube.client import ApiError
from meshtls.policy.clock import Clock
from meshtls.policy.namespaces import namespace_terminating
from meshtls.policy.peering import outranked_by_live_peer

log = logging.getLogger("meshtls.identity")
PAUSED_RECHECK = dt.timedelta(seconds=5)
PEERING_POLL = 2.0  # seconds


@dataclass
class _HeldLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@contextlib.asynccontextmanager
async def identity_lock(op: Operator, key: IdentityKey) -> AsyncIterator[None]:
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
    locks: dict[IdentityKey, _HeldLock] = field(default_factory=dict)  # only while someone holds or waits for one
    targets: TargetIndex = field(default_factory=TargetIndex)  # identities with a sidecar, for the webhook
    rendered: dict[IdentityKey, dict[str, str]] = field(default_factory=dict)  # sidecar ConfigMap data last written
    selection: PodSelectionIndex = field(default_factory=PodSelectionIndex)  # every identity's pods, for overlaps
    selection_known: set[str] = field(default_factory=set)  # namespaces whose identities are all in `selection`
    selection_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # content of the Secret last written or verified
    secret_digests: dict[IdentityKey, str] = field(default_factory=dict)
    handled: dict[IdentityKey, tuple[Any, ...]] = field(default_factory=dict)  # last event fingerprint reconciled
    background: set[asyncio.Task[None]] = field(default_factory=set)
    default_data_plane: DataPlane = DEFAULT_DATA_PLANE  # when neither an identity nor its TrustDomain names one
    paused: bool = False  # kopf peering: a live peer with a higher priority acts instead of this replica; set_paused
    # the same, for whoever waits on it (controller/watching.py's watches stand still while paused)
    acting: asyncio.Event = field(default_factory=asyncio.Event)
    standing_by: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.scheduler = RenewalScheduler(self.clock, self.reconcile_key)
        self.set_paused(self.paused)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        (self.standing_by if paused else self.acting).set()
        (self.acting if paused else self.standing_by).clear()

    async def reconcile_key(self, key: Key) -> None:
        if self.paused:  # a peer with a higher priority acts; look again later, it may be gone by then
            self.scheduler.schedule(key, self.clock.now() + PAUSED_RECHECK)
            return
        # imported here: identities and trust domains are reconciled by modules that build on this one
        from meshtls.controller.identity import reconcile
        from meshtls.controller.trust_domains import reconcile_trust_domain_named

        if isinstance(key, TrustDomainKey):  # a trust domain's CA rotation timer shares the heap
            await reconcile_trust_domain_named(self, key.name)
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
                op.set_paused(paused)
                if not paused:
                    op.handled.clear()  # kopf re-lists on resume: reconcile everything once
        except Exception as exc:
            log.warning("reading peering %s failed: %s", name, exc)
        await asyncio.sleep(PEERING_POLL)


def later(op: Operator, delay: dt.timedelta, work: Coroutine[Any, Any, None]) -> None:
    async def run() -> None:
        await asyncio.sleep(delay.total_seconds())
        await work

    task = asyncio.create_task(run())
    op.background.add(task)
    task.add_done_callback(op.background.discard)


def identity_ref(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion", API_VERSION), "kind": body.get("kind", KIND_WORKLOAD_IDENTITY),
            "name": meta["name"], "uid": meta["uid"]}
