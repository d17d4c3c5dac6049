"""Following what trust domains read and write beside their own resource, so that a change is acted on at once.

- The Secrets a trust domain reads in the operator's namespace (a brought CA, its CA state, a federated bundle
  kept there) are looked at by name every SECRET_POLL seconds: the operator's RBAC there is named reads and writes
  only, no list or watch. A brought CA deleted, replaced or appearing, or a deleted CA state Secret, reconciles the
  trust domain at once (a deleted state is written back from memory).
- The bundle ConfigMaps meshtls published (label meshtls.dev/bundle=true) are watched by kopf
  (`kopf_handlers.bundle_configmap_event`): deleted or edited ones are restored, judged by content.
"""

from __future__ import annotations

import asyncio
import logging

from meshtls.handlers.reconcile import TRUST_DOMAIN_KEY, Operator
from meshtls.handlers.trust import state_secret_name

log = logging.getLogger("meshtls.trust")
SECRET_POLL = 2.0  # seconds between looks at the Secrets trust domains read


async def follow_trust_secrets(op: Operator, operator_namespace: str) -> None:
    """Until cancelled: reconcile a trust domain when a Secret it reads in the operator's namespace changed."""
    seen: dict[str, str | None] = {}  # Secret name -> resourceVersion (None: absent)
    while True:
        await asyncio.sleep(SECRET_POLL)
        if op.paused:
            continue
        try:
            await _look_once(op, operator_namespace, seen)
        except Exception as exc:  # a failed look is repeated at the next poll
            log.warning("reading the Secrets trust domains use failed: %s", exc)


async def _look_once(op: Operator, operator_namespace: str, seen: dict[str, str | None]) -> None:
    wanted: dict[str, list[str]] = {}
    for td, refs in list(op.trust.refs.items()):
        for kind, namespace, name in refs:
            if kind == "Secret" and namespace == operator_namespace:
                wanted.setdefault(name, []).append(td)
    for name in list(seen):
        if name not in wanted:
            del seen[name]
    for name, trust_domains in sorted(wanted.items()):
        secret = await op.kube.run(op.kube.read_secret, operator_namespace, name)
        version = secret.resource_version if secret.exists else None
        if name not in seen:
            seen[name] = version
            continue
        if seen[name] == version:
            continue
        seen[name] = version
        for td in trust_domains:
            if version is not None and name == state_secret_name(td):
                continue  # our own state writes (a deleted state shows as None)
            log.info("Secret %s/%s %s: reconciling trust domain %s", operator_namespace, name,
                     "changed" if version else "deleted", td)
            op.scheduler.schedule((TRUST_DOMAIN_KEY, td), op.clock.now())


async def on_bundle_configmap(op: Operator, event_type: str, namespace: str, name: str,
                              data: dict[str, str] | None) -> None:
    if event_type == "DELETED":
        data = None
    if op.trust.bundle_changed(namespace, name, data):
        log.info("bundle %s/%s %s: restoring it", namespace, name, "deleted" if data is None else "changed")
        await op.trust.publish_bundle(namespace, name)
