"""Publishing trust bundles: a namespace's bundle ConfigMap (per name) carries the roots and CRLs of every trust
domain that publishes into it under that name, merged in the order of the trust domains' names
(`policy.trust_policy.merge_bundle`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshtls.api.constants import (
    ANNOTATION_TRUST_DOMAINS,
    LABEL_BUNDLE,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
)
from meshtls.controller import metrics
from meshtls.controller.trust.domain import Key, TrustDomainRuntime
from meshtls.kube import Conflict, NotFound
from meshtls.kube.client import ApiError
from meshtls.policy.trust_policy import bundle_matches, bundle_trust_domains, merge_bundle

if TYPE_CHECKING:
    from meshtls.controller.trust.registry import TrustDomains

log = logging.getLogger("meshtls.trust")
OWN_VERSIONS = 4  # a bundle's own patches remembered until their event comes back
# bundles written at once, on the lane of FIRST_THREADS (24): the rest of the lane stays free for the reads of the
# deletions that join the next round
PUBLISH_CONCURRENCY = 16


async def bind(trust: TrustDomains, runtime: TrustDomainRuntime, key: Key) -> None:
    """The identity `key` is issued under `runtime`: its namespace's bundle carries that trust domain (and no
    longer the one it left, if no other identity there needs it)."""
    namespace = key[0]
    left = [r for r in trust.domains.values() if r is not runtime and key in r.identities]
    for other in left:
        other.identities.discard(key)
    fresh = not runtime.active_in(namespace) or namespace not in runtime.namespaces
    runtime.identities.add(key)
    runtime.namespaces.add(namespace)
    if fresh or left:
        names = {runtime.spec.bundle_configmap} | {r.spec.bundle_configmap for r in left}
        await asyncio.gather(*(trust.publish_bundle(namespace, name) for name in sorted(names)))
    elif (namespace, runtime.spec.bundle_configmap) not in trust.published:
        await trust.publish_bundle(namespace, runtime.spec.bundle_configmap)


async def unbind(trust: TrustDomains, key: Key) -> None:
    """The identity is gone: its trust domain leaves the namespace's bundle if no other identity there needs
    it and another trust domain still publishes there."""
    names = set()
    for r in trust.domains.values():
        if key in r.identities:
            r.identities.discard(key)
            names.add(r.spec.bundle_configmap)
    for name in sorted(names):
        await trust.publish_bundle(key[0], name)


async def withdraw(trust: TrustDomains, runtime: TrustDomainRuntime) -> None:
    """A deleted trust domain leaves every bundle it was merged into."""
    names = {runtime.spec.bundle_configmap} | runtime.bundle_names
    for ns in sorted(runtime.namespaces | runtime.selected):
        for name in sorted(names):
            await trust.publish_bundle(ns, name)


async def publish(trust: TrustDomains, runtime: TrustDomainRuntime, namespaces: list[str] | None = None) -> int:
    """Write the bundle ConfigMap of each namespace the trust domain serves; returns how many were written."""
    targets = set(namespaces) if namespaces is not None else set(runtime.namespaces)
    if namespaces is None:
        if runtime.spec.bundle_namespace_selector:
            selector = ",".join(f"{k}={v}" for k, v in runtime.spec.bundle_namespace_selector.items())
            runtime.selected = set(await trust.kube.run_first(trust.kube.list_namespaces, selector))
        else:
            runtime.selected = set()
        targets |= runtime.selected | set(runtime.identities.per_namespace)
    current = runtime.spec.bundle_configmap
    slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)

    async def one(ns: str, name: str) -> bool:
        async with slots:
            return await trust.publish_bundle(ns, name, drop_if_empty=name != current)

    renamed = sorted(runtime.bundle_names - {current})
    if renamed:  # the old name: merged without this trust domain, or removed when nothing else publishes there
        await asyncio.gather(*(one(ns, old) for ns in sorted(targets) for old in renamed))
    runtime.bundle_names = {current}
    written = sum(await asyncio.gather(*(one(ns, current) for ns in sorted(targets))))
    if written:
        metrics.crl_writes.labels(runtime.name).inc()
    return written


def contributors(trust: TrustDomains, namespace: str, name: str) -> list[TrustDomainRuntime]:
    """The trust domains a bundle ConfigMap carries: those with an identity in (or selecting) the namespace;
    when none has, those that published there before (a namespace whose last identity left keeps its bundle
    and the CRL that revoked it)."""
    under_name = [r for r in trust.domains.values() if r.spec.bundle_configmap == name]
    active = [r for r in under_name if r.active_in(namespace)]
    return active or [r for r in under_name if namespace in r.namespaces]


def wanted_bundle(trust: TrustDomains, namespace: str, name: str) -> dict[str, str] | None:
    found = trust.contributors(namespace, name)
    return merge_bundle([r.contribution() for r in found]) if found else None


async def publish_bundle(trust: TrustDomains, namespace: str, name: str, drop_if_empty: bool = False) -> bool:
    """Bring one bundle ConfigMap to the merge of its trust domains; True when something was written."""
    key = (namespace, name)
    lock = trust.bundle_locks.setdefault(key, asyncio.Lock())
    async with lock:
        found = trust.contributors(namespace, name)
        if not found:
            trust.published.pop(key, None)
            trust.bundle_conflicts.pop(key, None)
            return await _remove_bundle(trust, namespace, name) if drop_if_empty else False
        contributions = [r.contribution() for r in found]
        data = merge_bundle(contributions)
        if trust.published.get(key) == data:
            return False
        for r in found:
            r.namespaces.add(namespace)
        return await _write_bundle(trust, namespace, name, data, bundle_trust_domains(contributions))


async def _remove_bundle(trust: TrustDomains, namespace: str, name: str) -> bool:
    current = await trust.kube.run_first(trust.kube.read_configmap, namespace, name)
    if current is None or current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
        return False
    try:
        await trust.kube.run_first(trust.kube.delete_configmap, namespace, name, current.get("uid"))
    except Exception as exc:
        log.warning("could not remove the bundle %s/%s: %s", namespace, name, exc)
        return False
    log.info("bundle %s/%s removed: no trust domain publishes under that name there any more", namespace, name)
    return True


async def _write_bundle(trust: TrustDomains, namespace: str, name: str, data: dict[str, str],
                        trust_domains: str) -> bool:
    key = (namespace, name)
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUNDLE: "true"}
    if "," not in trust_domains:
        labels[LABEL_TRUST_DOMAIN] = trust_domains  # a label holds one; the annotation names them all
    annotations = {ANNOTATION_TRUST_DOMAINS: trust_domains}
    if key in trust.published:
        # one meshtls wrote or confirmed: one request, no read first (a revocation storm writes every bundle once
        # per round); the patch tests the managed-by label, so a ConfigMap not ours is still never written
        try:
            version = await trust.kube.run_first(trust.kube.update_owned_configmap, namespace, name, data, labels,
                                                 annotations)
        except (NotFound, Conflict):
            pass  # gone, or replaced: read and decide, below
        except ApiError as exc:
            # 422: the label test failed (not ours any more); 403: an older RBAC without `patch`: read and decide
            if exc.status not in (403, 422):
                return await _write_failed(trust, namespace, exc)
        except Exception as exc:
            return await _write_failed(trust, namespace, exc)
        else:
            trust.published[key] = data
            # its watch event is ours, even when a newer CRL is already signed: no restore for it (OWN_VERSIONS:
            # a bound, should events be missed)
            trust.own_versions[key] = [*trust.own_versions.get(key, [])[-(OWN_VERSIONS - 1):], version]
            return True
    for _attempt in range(3):
        current = await trust.kube.run_first(trust.kube.read_configmap, namespace, name)
        if current is not None and current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
            if key not in trust.bundle_conflicts:
                log.warning("ConfigMap %s/%s exists and is not managed by meshtls: bundle not published there",
                            namespace, name)
            trust.bundle_conflicts[key] = (f"ConfigMap {namespace}/{name} exists and is not managed by meshtls: "
                                          "the trust bundle is not published there")
            trust.published.pop(key, None)
            return False
        trust.bundle_conflicts.pop(key, None)
        if (current is not None and bundle_matches(current["data"], data)
                and current.get("annotations", {}).get(ANNOTATION_TRUST_DOMAINS) == trust_domains):
            trust.published[key] = data
            return False
        try:
            await trust.kube.run_first(trust.kube.write_configmap, namespace, name, data, labels, current,
                                       annotations=annotations)
        except Conflict:
            continue
        except Exception as exc:
            return await _write_failed(trust, namespace, exc)
        trust.published[key] = data
        return True
    return False


async def _write_failed(trust: TrustDomains, namespace: str, exc: Exception) -> bool:
    """A bundle write failed: a namespace being deleted must not stop the others. Returns False (nothing written)."""
    if await _namespace_alive(trust, namespace):
        log.warning("could not publish the bundle into %s: %s", namespace, exc)
    return False


async def _namespace_alive(trust: TrustDomains, namespace: str) -> bool:
    """False (and the namespace forgotten) when it is gone or terminating: no bundle is owed there any more."""
    try:
        if await trust.kube.run_first(trust.kube.namespace_exists, namespace):
            return True
    except Exception:
        return True  # cannot tell: keep it, the next publish tries again
    log.info("namespace %s is gone or terminating: no bundle published there any more", namespace)
    for r in trust.domains.values():
        r.namespaces.discard(namespace)
        r.selected.discard(namespace)
        for key in [k for k in r.identities if k[0] == namespace]:
            r.identities.discard(key)
    for bundle in [k for k in trust.published if k[0] == namespace]:
        trust.published.pop(bundle, None)
    return False


def bundle_changed(trust: TrustDomains, namespace: str, name: str, data: dict[str, str] | None,
                   version: str = "") -> bool:
    """A bundle ConfigMap was changed or deleted: True when it differs from what meshtls would write (it is
    then republished). Judged by content, so our own writes coming back cost nothing; and an event of a version
    meshtls patched itself is not a change, even when a newer CRL has been signed since (that one is being
    written: a revocation round's bundles come back while the next round signs)."""
    own = trust.own_versions.get((namespace, name))
    if version and own and version in own:
        del own[:own.index(version) + 1]  # events come in order: those before it will not come any more
        return False
    wanted = trust.wanted_bundle(namespace, name)
    if wanted is None or bundle_matches(data, wanted):
        return False
    trust.published.pop((namespace, name), None)
    return True


def conflicts_of(trust: TrustDomains, runtime: TrustDomainRuntime) -> list[str]:
    name = runtime.spec.bundle_configmap
    return [message for (ns, cm), message in sorted(trust.bundle_conflicts.items())
            if cm == name and (runtime.active_in(ns) or ns in runtime.namespaces)]
