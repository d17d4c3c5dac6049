"""Which identities a pod may carry, answered from memory so admission never waits on the API server."""

from __future__ import annotations

from collections.abc import Mapping

from meshtls.injection.target import InjectionTarget


class TargetIndex:
    """WorkloadIdentities with a sidecar, by (namespace, serviceAccount): the webhook answers from memory."""

    def __init__(self) -> None:
        self._by_sa: dict[tuple[str, str], dict[str, InjectionTarget]] = {}
        self._where: dict[tuple[str, str], tuple[str, str]] = {}

    def put(self, namespace: str, target: InjectionTarget) -> None:
        self.remove(namespace, target.identity_name)
        self._by_sa.setdefault((namespace, target.service_account), {})[target.identity_name] = target
        self._where[(namespace, target.identity_name)] = (namespace, target.service_account)

    def remove(self, namespace: str, identity_name: str) -> None:
        where = self._where.pop((namespace, identity_name), None)
        if where is not None:
            self._by_sa.get(where, {}).pop(identity_name, None)

    def lookup(self, namespace: str, service_account: str) -> list[InjectionTarget]:
        """Every sidecar identity of the ServiceAccount: admission picks the one whose podSelector matches."""
        return list(self._by_sa.get((namespace, service_account), {}).values())


def selectors_overlap(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether some pod can match both matchLabels selectors: yes unless they want different values for a label
    (an empty selector selects every pod of the ServiceAccount)."""
    return all(b[k] == v for k, v in a.items() if k in b)


class PodSelectionIndex:
    """Every WorkloadIdentity (sidecar or not) by (namespace, serviceAccount) with its pod selector: two that would
    put certificates on the same pods are told about each other."""

    def __init__(self) -> None:
        self._by_sa: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
        self._where: dict[tuple[str, str], str] = {}

    def put(self, namespace: str, name: str, service_account: str, selector: Mapping[str, str]) -> set[str]:
        """Record the identity; returns the other identities whose overlap set changed (they report it again)."""
        groups = {service_account, self._where.get((namespace, name), service_account)}
        before = self._overlap_sets(namespace, groups, name)
        self._drop(namespace, name)
        self._by_sa.setdefault((namespace, service_account), {})[name] = dict(selector)
        self._where[(namespace, name)] = service_account
        return self._changed(namespace, groups, name, before)

    def remove(self, namespace: str, name: str) -> set[str]:
        sa = self._where.get((namespace, name))
        if sa is None:
            return set()
        before = self._overlap_sets(namespace, {sa}, name)
        self._drop(namespace, name)
        return self._changed(namespace, {sa}, name, before)

    def overlapping(self, namespace: str, name: str) -> list[str]:
        sa = self._where.get((namespace, name))
        if sa is None:
            return []
        mine = self._by_sa[(namespace, sa)][name]
        return sorted(other for other, sel in self._by_sa[(namespace, sa)].items()
                      if other != name and selectors_overlap(mine, sel))

    def _drop(self, namespace: str, name: str) -> None:
        sa = self._where.pop((namespace, name), None)
        if sa is not None:
            self._by_sa.get((namespace, sa), {}).pop(name, None)

    def _overlap_sets(self, namespace: str, groups: set[str], name: str) -> dict[str, list[str]]:
        return {n: self.overlapping(namespace, n) for sa in groups for n in self._by_sa.get((namespace, sa), {})
                if n != name}

    def _changed(self, namespace: str, groups: set[str], name: str, before: dict[str, list[str]]) -> set[str]:
        after = self._overlap_sets(namespace, groups, name)
        return {n for n in set(before) | set(after) if before.get(n, []) != after.get(n, [])}
