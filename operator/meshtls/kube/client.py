"""Every Kubernetes API call the operator makes, in one place: easy to count, to audit for RBAC, and to replace
(the `meshtls` CLI's further reads and the heartbeat are in `queries.py`, beside it).

Methods are synchronous (the official client is); async callers run them in a thread (`Kube.run`), so a slow
API call never blocks the operator's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from meshtls.api.constants import (
    GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    TRUST_DOMAINS,
    VERSION,
    WORKLOAD_IDENTITIES,
)
from meshtls.api.objects import ABSENT, SecretSnapshot

T = TypeVar("T")
JSON_PATCH = "application/json-patch+json"


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The object changed (or appeared) since it was read: read again and decide again."""


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status


def _translate(exc: ApiException) -> Exception:
    if exc.status == 404:
        return NotFound(exc.reason)
    if exc.status == 409:
        return Conflict(exc.reason)
    import json

    try:
        message = json.loads(exc.body or "{}").get("message", exc.reason)
    except ValueError:
        message = exc.reason
    return ApiError(exc.status or 0, exc.reason or "", message)


def or_none(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """The object, or None when the API says it does not exist (404); every other error propagates."""
    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def api_call(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise _translate(exc) from None

    return wrapper


def use_kubeconfig(path: str) -> None:
    """Make `path` the kubeconfig for every later default load (kopf's login included): the client read
    $KUBECONFIG once, at import."""
    from kubernetes.config import kube_config

    os.environ["KUBECONFIG"] = path
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path


def connect(kubeconfig: str | None = None, pool_size: int = 32) -> Kube:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    # The default pool (cores x 5) makes threads queue for connections under load.
    configuration.connection_pool_maxsize = pool_size
    return Kube(client.ApiClient(configuration), pool_size)


def _decode(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in data.items()}


def request_resource(url: str) -> str:
    """The resource a request URL addresses, with its subresource: "secrets", "workloadidentities/status"."""
    path = url.split("://", 1)[-1].split("?", 1)[0]
    parts = [p for p in path.split("/")[1:] if p]  # the host dropped
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    if len(parts) > 2 and parts[0] == "namespaces":
        parts = parts[2:]
    if not parts:
        return ""
    return parts[0] if len(parts) < 3 else f"{parts[0]}/{parts[2]}"


class Kube:
    def __init__(self, api_client: client.ApiClient, threads: int = 16) -> None:
        self.api_client = api_client
        # every request this client sends, counted where all of them pass (the typed APIs and the plain ones)
        self.on_request: Callable[[str, str], None] = lambda verb, resource: None
        send = api_client.call_api

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.on_request(method, request_resource(url))
            return send(method, url, *args, **kwargs)

        api_client.call_api = counted  # type: ignore[method-assign]
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # --- WorkloadIdentities -------------------------------------------------------------------------------------

    @api_call
    def get_workload_identity(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = or_none(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, WORKLOAD_IDENTITIES, name)
        return dict(obj) if obj is not None else None

    @api_call
    def list_workload_identities(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, WORKLOAD_IDENTITIES)
        else:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, WORKLOAD_IDENTITIES)
        return list(result.get("items", []))

    @api_call
    def patch_workload_identity_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, WORKLOAD_IDENTITIES, name, {"status": status}
        )

    @api_call
    def patch_workload_identity_annotations(self, namespace: str, name: str,
                                            annotations: Mapping[str, str | None]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, WORKLOAD_IDENTITIES, name, {"metadata": {"annotations": dict(annotations)}}
        )

    @api_call
    def add_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str,
                                        current: list[str], resource_version: str) -> None:
        """Add our finalizer to the version we saw (JSON Patch `test`): never clobber another controller's."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}]
        if current:
            ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer})
        else:
            ops.append({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, WORKLOAD_IDENTITIES, name, ops,
                                                   _content_type=JSON_PATCH)

    @api_call
    def remove_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str,
                                           current: list[str]) -> None:
        index = current.index(finalizer)
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
        try:
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, WORKLOAD_IDENTITIES, name, ops,
                                                       _content_type=JSON_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise

    @api_call
    def read_peering_status(self, name: str, namespace: str | None) -> dict[str, Any]:
        """The status (peer -> priority, lifetime, lastseen) of kopf's peering object, {} when absent."""
        if namespace is None:
            obj = or_none(self.custom.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", name)
        else:
            obj = or_none(self.custom.get_namespaced_custom_object, "kopf.dev", "v1", namespace, "kopfpeerings", name)
        return dict((obj or {}).get("status") or {})

    # --- TrustDomains ------------------------------------------------------------------------------------------

    @api_call
    def get_trust_domain(self, name: str) -> dict[str, Any] | None:
        obj = or_none(self.custom.get_cluster_custom_object, GROUP, VERSION, TRUST_DOMAINS, name)
        return dict(obj) if obj is not None else None

    @api_call
    def list_trust_domains(self) -> list[dict[str, Any]]:
        return list(self.custom.list_cluster_custom_object(GROUP, VERSION, TRUST_DOMAINS).get("items", []))

    @api_call
    def patch_trust_domain_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_cluster_custom_object_status(GROUP, VERSION, TRUST_DOMAINS, name, {"status": status})

    # --- Secrets -----------------------------------------------------------------------------------------------

    @api_call
    def read_secret(self, namespace: str, name: str) -> SecretSnapshot:
        s = or_none(self.core.read_namespaced_secret, name, namespace)
        if s is None:
            return ABSENT
        meta = s.metadata
        return SecretSnapshot(
            exists=True,
            name=meta.name,
            data=_decode(s.data),
            labels=dict(meta.labels or {}),
            annotations=dict(meta.annotations or {}),
            owner_uids=tuple(o.uid for o in meta.owner_references or ()),
            resource_version=meta.resource_version,
            uid=meta.uid,
        )

    @api_call
    def write_secret(self, body: dict[str, Any], current: SecretSnapshot) -> None:
        """Create, or replace in one write guarded by resourceVersion: a concurrent change raises Conflict."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if not current.exists:
            self.core.create_namespaced_secret(namespace, body)
            return
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": current.resource_version}}
        self.core.replace_namespaced_secret(name, namespace, body)

    @api_call
    def delete_secret(self, namespace: str, name: str, uid: str) -> None:
        """Delete only that very object (uid precondition): never a same-named Secret created since."""
        try:
            self.core.delete_namespaced_secret(
                name, namespace, body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- ConfigMaps (trust bundles, sidecar configs) -----------------------------------------------------------

    @api_call
    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        cm = or_none(self.core.read_namespaced_config_map, name, namespace)
        if cm is None:
            return None
        return {"data": dict(cm.data or {}), "labels": dict(cm.metadata.labels or {}),
                "annotations": dict(cm.metadata.annotations or {}), "uid": cm.metadata.uid,
                "resourceVersion": cm.metadata.resource_version}

    @api_call
    def write_configmap(self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str],
                        current: dict[str, Any] | None, owner: Mapping[str, Any] | None = None,
                        annotations: Mapping[str, str] | None = None) -> None:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)}, "data": dict(data)}
        if annotations:
            body["metadata"]["annotations"] = dict(annotations)
        if owner is not None:
            body["metadata"]["ownerReferences"] = [{**owner, "controller": True, "blockOwnerDeletion": False}]
        if current is None:
            self.core.create_namespaced_config_map(namespace, body)
        else:
            body["metadata"]["resourceVersion"] = current["resourceVersion"]
            self.core.replace_namespaced_config_map(name, namespace, body)

    @api_call
    def delete_configmap(self, namespace: str, name: str, uid: str | None) -> None:
        """Delete only that very object (uid precondition): never a same-named ConfigMap created since."""
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)) if uid else None
        try:
            self.core.delete_namespaced_config_map(name, namespace, body=options)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- Namespaces --------------------------------------------------------------------------------------------

    @api_call
    def list_namespaces(self, label_selector: str | None = None) -> list[str]:
        return [str(n.metadata.name) for n in self.core.list_namespace(label_selector=label_selector).items]

    @api_call
    def namespace_exists(self, name: str) -> bool:
        ns = or_none(self.core.read_namespace, name)
        return ns is not None and ns.status.phase != "Terminating"

    # --- Events ------------------------------------------------------------------------------------------------

    @api_call
    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str,
                   component: str = "meshtls-operator") -> None:
        """A core/v1 Event, so `kubectl get events --field-selector reason=Rotated` and `describe` show it."""
        now = dt.datetime.now(dt.UTC)
        namespace = involved.get("namespace") or "default"
        name = involved["name"]
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace,
                                         labels={LABEL_MANAGED_BY: MANAGED_BY}),
            involved_object=client.V1ObjectReference(
                api_version=involved.get("apiVersion"), kind=involved.get("kind"), name=name,
                namespace=involved.get("namespace"), uid=involved.get("uid"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            source=client.V1EventSource(component=component),
            reporting_component=component,
            reporting_instance=os.environ.get("HOSTNAME", component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self.core.create_namespaced_event(namespace, event)

    # --- Secrets in the operator's namespace (the CA) ----------------------------------------------------------

    @api_call
    def write_opaque_secret(self, namespace: str, name: str, data: Mapping[str, bytes], labels: Mapping[str, str],
                            current: SecretSnapshot) -> None:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                "data": _encode(data)}
        if not current.exists:
            self.core.create_namespaced_secret(namespace, body)
        else:
            body["metadata"]["resourceVersion"] = current.resource_version
            self.core.replace_namespaced_secret(name, namespace, body)

    # --- the injection webhook's configuration ------------------------------------------------------------------

    @api_call
    def apply_mutating_webhook_configuration(self, name: str, webhooks: list[dict[str, Any]],
                                             labels: Mapping[str, str]) -> None:
        """Create the configuration, or replace its webhooks (keeping what Helm set on the object itself)."""
        body: dict[str, Any] = {"apiVersion": "admissionregistration.k8s.io/v1",
                                "kind": "MutatingWebhookConfiguration",
                                "metadata": {"name": name, "labels": dict(labels)}, "webhooks": webhooks}
        try:
            current = self.admission.read_mutating_webhook_configuration(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.admission.create_mutating_webhook_configuration(body)
            return
        body["metadata"]["labels"] = {**(current.metadata.labels or {}), **labels}
        body["metadata"]["annotations"] = current.metadata.annotations
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        self.admission.replace_mutating_webhook_configuration(name, body)

    @api_call
    def read_mutating_webhook_configuration(self, name: str) -> dict[str, Any] | None:
        obj = or_none(self.admission.read_mutating_webhook_configuration, name)
        return dict(self.api_client.sanitize_for_serialization(obj)) if obj is not None else None
