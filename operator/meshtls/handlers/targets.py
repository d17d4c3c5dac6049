"""Which identities a pod may carry, answered from memory so admission never waits on the API server."""

from __future__ import annotations

from collections.abc import Mapping

from meshtls.sidecar.target import InjectionTarget


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

    def lookup(self, namespace: str, service_account: str, labels: Mapping[str, str]) -> list[InjectionTarget]:
        return list(self._by_sa.get((namespace, service_account), {}).values())
