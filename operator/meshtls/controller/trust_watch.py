"""Following what trust domains read and write beside their own resource, so that a change is acted on at once.

- The Secrets a trust domain reads in the operator's namespace are looked at by name every SECRET_POLL seconds
  (the operator's RBAC there is named reads and writes only, no list or watch): a brought CA deleted, replaced or
  appearing since the trust domain's last load, or its CA state Secret gone while the CA is held in memory,
  reconciles the trust domain at once (a deleted state is written back from memory, never a new CA).
- The bundle ConfigMaps meshtls published (label meshtls.dev/bundle=true) are watched by kopf
  (`operator.handlers.bundle_configmap_event`): deleted or edited ones are restored, judged by content.
"""

from __future__ import annotations

import asyncio
import logging

from meshtls.api.names import state_secret_name
from meshtls.controller.runtime import Operator
from meshtls.controller.scheduler import TrustDomainKey

log = logging.getLogger("meshtls.trust")
SECRET_POLL = 2.0  # seconds between looks at the Secrets trust domains read


async def follow_trust_secrets(op: Operator, operator_namespace: str) -> None:
    """Until cancelled: reconcile a trust domain when a Secret it reads in the operator's namespace changed."""
    while True:
        await asyncio.sleep(SECRET_POLL)
        if op.paused:
            continue
        try:
            await _look_once(op, operator_namespace)
        except Exception as exc:  # a failed look is repeated at the next poll
            log.warning("reading the Secrets trust domains use failed: %s", exc)


async def _look_once(op: Operator, operator_namespace: str) -> None:
    versions: dict[str, str | None] = {}

    async def version(name: str) -> str | None:
        if name not in versions:
            secret = await op.kube.run(op.kube.read_secret, operator_namespace, name)
            versions[name] = secret.resource_version if secret.exists else None
        return versions[name]

    due: dict[str, str] = {}
    for (td, name), loaded in sorted(op.trust.read_versions.items()):
        current = await version(name)
        if current != loaded:
            op.trust.read_versions[(td, name)] = current  # acted on once; the reload records it again
            due[td] = f"Secret {operator_namespace}/{name} {'changed' if current else 'deleted'}"
    for runtime in op.trust.loaded():
        state = state_secret_name(runtime.name)
        if runtime.name not in op.trust.problems and await version(state) is None:
            due[runtime.name] = f"CA state Secret {operator_namespace}/{state} deleted"
    for td, why in sorted(due.items()):
        log.info("%s: reconciling trust domain %s", why, td)
        op.scheduler.schedule(TrustDomainKey(td), op.clock.now())


async def on_bundle_configmap(op: Operator, event_type: str, namespace: str, name: str,
                              data: dict[str, str] | None, version: str = "") -> None:
    if event_type == "DELETED":
        data, version = None, ""
    if op.trust.bundle_changed(namespace, name, data, version):
        log.info("bundle %s/%s %s: restoring it", namespace, name, "deleted" if data is None else "changed")
        await op.trust.publish_bundle(namespace, name)
