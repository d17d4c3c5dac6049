"""Small helpers the e2e suites share: apply manifests, wait for conditions, read Secrets and Events."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "meshtls.dev", "v1alpha1"
T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll until fn returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except ApiException as exc:
            last = exc
            if exc.status not in (404, 409, 500, 503):
                raise
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def create_trust_domain(self, name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrustDomain", "metadata": {"name": name},
                "spec": spec or {}}
        try:
            return dict(self.custom.create_cluster_custom_object(GROUP, VERSION, "trustdomains", body))
        except ApiException as exc:
            if exc.status != 409:
                raise
            return dict(self.custom.get_cluster_custom_object(GROUP, VERSION, "trustdomains", name))

    def trust_domain(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_cluster_custom_object(GROUP, VERSION, "trustdomains", name))

    def delete_trust_domain(self, name: str, operator_namespace: str = "meshtls-system") -> None:
        """The TrustDomain and the CA state Secret the operator keeps for it, whichever of them exists."""
        for delete in (lambda: self.custom.delete_cluster_custom_object(GROUP, VERSION, "trustdomains", name),
                       lambda: self.core.delete_namespaced_secret(f"meshtls-ca-{name}", operator_namespace)):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def create_identity(self, namespace: str, name: str, spec: dict[str, Any],
                        annotations: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadIdentity",
                "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}}, "spec": spec}
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities",
                                                                 body))

    def identity(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities",
                                                                  name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_identity(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities", name, patch)

    def delete_identity(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities", name)

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            s = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def events(self, namespace: str, reason: str | None = None, name: str | None = None) -> list[Any]:
        selectors = []
        if reason:
            selectors.append(f"reason={reason}")
        if name:
            selectors.append(f"involvedObject.name={name}")
        return list(self.core.list_namespaced_event(namespace, field_selector=",".join(selectors) or None).items)


def ready_condition(body: dict[str, Any] | None) -> dict[str, Any]:
    for c in (body or {}).get("status", {}).get("conditions", []):
        if c.get("type") == "Ready":
            return dict(c)
    return {}


def is_ready(body: dict[str, Any] | None) -> bool:
    return ready_condition(body).get("status") == "True"
