"""Watches for what trust domains read and write beside their own resource, so that a change is acted on at once:

- the Secrets in the operator's namespace: a brought CA deleted, replaced or appearing; a CA state Secret deleted
  (written back from memory); a federated bundle kept in a Secret there;
- the bundle ConfigMaps meshtls published (label meshtls.dev/bundle=true): deleted or edited ones are restored.

Each runs the client's blocking watch in a thread and hands events to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from meshtls.api.constants import LABEL_BUNDLE, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.handlers.reconcile import TRUST_DOMAIN_KEY, Operator

log = logging.getLogger("meshtls.trust")
RESTART_DELAY = 5.0  # seconds before a failed watch starts again


async def _watch(op: Operator, kind: str, namespace: str | None, selector: str | None,
                 handle: Any, stop: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def on_event(type_: str, obj: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (type_, obj))

    async def consume() -> None:
        while True:
            type_, obj = await queue.get()
            try:
                await handle(op, type_, obj)
            except Exception as exc:  # one bad event must not end the watch
                log.warning("handling a %s event failed: %s", kind, exc)

    consumer = asyncio.create_task(consume())
    try:
        while not stop.is_set():
            try:
                await asyncio.to_thread(op.kube.watch_objects, kind, namespace, selector, on_event, stop.is_set)
            except Exception as exc:
                log.warning("watching %ss%s failed (%s); again in %.0f s", kind,
                            f" in {namespace}" if namespace else "", exc, RESTART_DELAY)
                await asyncio.sleep(RESTART_DELAY)
    finally:
        stop.set()
        consumer.cancel()


async def _operator_secret_event(op: Operator, type_: str, obj: dict[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    for name in op.trust.referencing("Secret", str(meta.get("namespace")), str(meta.get("name"))):
        if type_ == "MODIFIED" and (meta.get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY \
                and _is_state_secret(op, name, meta):
            continue  # our own state write coming back (a deleted one comes as DELETED)
        op.scheduler.schedule((TRUST_DOMAIN_KEY, name), op.clock.now())


def _is_state_secret(op: Operator, trust_domain: str, meta: dict[str, Any]) -> bool:
    from meshtls.handlers.trust import state_secret_name

    return str(meta.get("name")) == state_secret_name(trust_domain)


async def _bundle_event(op: Operator, type_: str, obj: dict[str, Any]) -> None:
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    data = None if type_ == "DELETED" else dict(obj.get("data") or {})
    if op.trust.bundle_changed(namespace, name, data):
        log.info("bundle %s/%s %s: restoring it", namespace, name, "deleted" if data is None else "changed")
        await op.trust.publish_bundle(namespace, name)


async def watch_trust_objects(op: Operator, operator_namespace: str) -> None:
    """Both watches, until cancelled."""
    stop = threading.Event()
    try:
        await asyncio.gather(
            _watch(op, "Secret", operator_namespace, None, _operator_secret_event, stop),
            _watch(op, "ConfigMap", None, f"{LABEL_BUNDLE}=true", _bundle_event, stop),
        )
    finally:
        stop.set()
