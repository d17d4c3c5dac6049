"""Following the two hot resources, WorkloadIdentities and the Secrets meshtls writes, outside kopf.

kopf turns every watch event into causes, loggers, a diff base and a per-object memory before a handler sees it;
for the ~3 events an issuance brings back (the identity, its status write, its Secret) that machinery cost more CPU
than the issuance, and its memory grew with every object. Here a plain list-and-watch per namespace served hands
each event to the same handlers, one at a time per object (the newest event wins while one is being handled), and
lets go of an object's entry once it is handled. Like kopf's watchers, these stand still while a higher-priority
peer acts (`op.paused`) and list everything again when this replica takes over.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from meshtls.api.constants import LABEL_IDENTITY, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.controller.identity import on_identity_event
from meshtls.controller.runtime import Operator
from meshtls.controller.scheduler import IdentityKey
from meshtls.kube.client import Gone, identities_path, secrets_path
from meshtls.policy.issuance import secret_digest

log = logging.getLogger("meshtls.watch")
WATCH_SECONDS = 120  # the server ends each watch after this; it is resumed from the last version seen
RETRY_SECONDS = 2.0
CONCURRENCY = 1024  # objects handled at once: bounds a burst (a first listing of ten thousand); deletions in a
# revocation storm wait together for one CRL publication, so a smaller bound would publish in rounds of that size
SECRET_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_IDENTITY}"

Handler = Callable[[str, dict[str, Any]], Awaitable[None]]


class PerObject:
    """Events handled one at a time per object, objects in parallel (up to CONCURRENCY); while one is being
    handled, only the newest of those that arrive meanwhile is kept. Nothing is held for an idle object."""

    def __init__(self, handle: Handler, concurrency: int = CONCURRENCY) -> None:
        self.handle = handle
        self.pending: dict[IdentityKey, tuple[str, dict[str, Any]]] = {}
        self.running: set[IdentityKey] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(concurrency)

    def submit(self, key: IdentityKey, event_type: str, obj: dict[str, Any]) -> None:
        self.pending[key] = (event_type, obj)
        if key not in self.running:
            self.running.add(key)
            task = asyncio.create_task(self._drain(key))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _drain(self, key: IdentityKey) -> None:
        try:
            async with self.slots:
                while (event := self.pending.pop(key, None)) is not None:
                    try:
                        await self.handle(*event)
                    except Exception:  # a handler's own failures are reported and retried by it; never stop here
                        log.exception("handling %s event of %s/%s failed", event[0] or "LISTED", *key)
        finally:
            self.running.discard(key)
            if key in self.pending:  # arrived after the loop ended, before the discard
                self.submit(key, *self.pending.pop(key))

    async def idle(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


def _key(obj: dict[str, Any], by_label: bool) -> IdentityKey:
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(LABEL_IDENTITY) if by_label else meta.get("name")
    return IdentityKey(str(meta.get("namespace")), str(name))


async def follow(op: Operator, path: str, selector: str | None, by_label: bool, queue: PerObject,
                 relisted: Callable[[set[IdentityKey]], None], skip: tuple[str, ...] = ()) -> None:
    """Until cancelled: list, hand every object over, watch from the list's version; list again when the version
    has expired or this replica resumes acting. `relisted` learns which keys exist after each listing."""
    while True:
        await op.acting.wait()
        watch = asyncio.create_task(_list_and_watch(op, path, selector, by_label, queue, relisted, skip))
        standby = asyncio.create_task(op.standing_by.wait())
        try:
            await asyncio.wait({watch, standby}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            standby.cancel()
        if watch.done() and not watch.cancelled() and (exc := watch.exception()) is not None:
            log.warning("watching %s failed (%s); listing again in %.0f s", path, exc, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


async def _list_and_watch(op: Operator, path: str, selector: str | None, by_label: bool, queue: PerObject,
                          relisted: Callable[[set[IdentityKey]], None], skip: tuple[str, ...]) -> None:
    items, version = await op.kube.run(op.kube.list_objects, path, selector)
    keys = set()
    for obj in items:
        key = _key(obj, by_label)
        keys.add(key)
        queue.submit(key, "", obj)  # "" as kopf's listing: neither ADDED nor MODIFIED
    del items
    relisted(keys)
    while True:
        try:
            async for event_type, obj in op.kube.watch_objects(path, selector, version, WATCH_SECONDS, skip):
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    queue.submit(_key(obj, by_label), event_type, obj)
        except Gone:
            return  # the caller lists again


# --- what each resource's events do -----------------------------------------------------------------------------


async def on_managed_secret_event(op: Operator, event_type: str, obj: dict[str, Any]) -> None:
    """A Secret meshtls wrote: deleted, or changed into anything but what meshtls wrote or verified, is reconciled."""
    key = _key(obj, by_label=True)
    if event_type == "DELETED":
        op.scheduler.schedule(key, op.clock.now())
        return
    if event_type == "ADDED" or (event_type == "" and key not in op.secret_digests):
        return  # its own create coming back; or listed before its identity was looked at (that reconcile will)
    # judged by content: annotations can be copied
    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    if op.secret_digests.get(key) != secret_digest(data):
        op.scheduler.schedule(key, op.clock.now())


def _in_scope(key: IdentityKey, namespace: str | None) -> bool:
    return namespace is None or key.namespace == namespace


async def follow_identities_and_secrets(op: Operator, namespaces: list[str]) -> None:
    """One watch of each kind per namespace served (one cluster-wide when all are served)."""
    identities = PerObject(lambda event_type, obj: on_identity_event(op, event_type, obj))
    secrets = PerObject(lambda event_type, obj: on_managed_secret_event(op, event_type, obj))

    def identities_listed(namespace: str | None) -> Callable[[set[IdentityKey]], None]:
        def gone_meanwhile(keys: set[IdentityKey]) -> None:  # deleted while nobody watched: forget them
            for key in [k for k in op.handled if _in_scope(k, namespace) and k not in keys]:
                identities.submit(key, "DELETED", {"metadata": {"namespace": key.namespace, "name": key.name}})
        return gone_meanwhile

    def secrets_listed(namespace: str | None) -> Callable[[set[IdentityKey]], None]:
        def gone_meanwhile(keys: set[IdentityKey]) -> None:  # deleted while nobody watched: repair them
            for key in [k for k in op.secret_digests if _in_scope(k, namespace) and k not in keys]:
                op.scheduler.schedule(key, op.clock.now())
        return gone_meanwhile

    scopes: list[str | None] = list(namespaces) if namespaces else [None]
    tasks = []
    for ns in scopes:
        tasks.append(follow(op, identities_path(ns), None, False, identities, identities_listed(ns)))
        # a Secret ADDED is meshtls's own create coming back (on_managed_secret_event ignores it): not even parsed
        tasks.append(follow(op, secrets_path(ns), SECRET_SELECTOR, True, secrets, secrets_listed(ns), ("ADDED",)))
    await asyncio.gather(*tasks)
