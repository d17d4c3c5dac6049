"""Every Kubernetes API call the operator makes, in one place: easy to count, to audit for RBAC, and to replace
(the `meshtls` CLI's further reads and the heartbeat are in `queries.py`, beside it).

Methods are synchronous (the official client is); async callers run them in a thread (`Kube.run`), so a slow
API call never blocks the operator's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import functools
import json
import os
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import urllib3
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
JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


class NotFound(Exception):
    pass


class Gone(Exception):
    """A watch's resourceVersion is too old to resume from (410): list again."""


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
    if exc.status == 410:
        return Gone(exc.reason)
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


# Threads of the lane of what a revocation waits for (`Kube.run_first`): the deleted identity's reads, the state
# Secret, bundle and status writes of its round, never queued behind the thousands of other requests of a storm.
FIRST_THREADS = 24


def connect(kubeconfig: str | None = None, pool_size: int = 32) -> Kube:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    # The default pool (cores x 5) makes threads queue for connections under load.
    configuration.connection_pool_maxsize = pool_size + FIRST_THREADS
    return Kube(client.ApiClient(configuration), pool_size)


def _decode(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (data or {}).items()}


def _encode(data: Mapping[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in data.items()}


def request_target(url: str) -> tuple[str, str]:
    """(namespace or "", resource with its subresource) a request URL addresses: ("ns", "workloadidentities/status")."""
    path = url.split("://", 1)[-1].split("?", 1)[0]
    parts = [p for p in path.split("/")[1:] if p]  # the host dropped
    if parts[:1] == ["api"]:
        parts = parts[2:]
    elif parts[:1] == ["apis"]:
        parts = parts[3:]
    namespace = ""
    if len(parts) > 2 and parts[0] == "namespaces":
        namespace, parts = parts[1], parts[2:]
    if not parts:
        return namespace, ""
    return namespace, parts[0] if len(parts) < 3 else f"{parts[0]}/{parts[2]}"


def request_resource(url: str) -> str:
    """The resource a request URL addresses, with its subresource: "secrets", "workloadidentities/status"."""
    return request_target(url)[1]


def _identity_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{WORKLOAD_IDENTITIES}/{name}"


def identities_path(namespace: str | None) -> str:
    """The WorkloadIdentity collection of one namespace, or of the cluster (None)."""
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"/apis/{GROUP}/{VERSION}{scope}/{WORKLOAD_IDENTITIES}"


def secrets_path(namespace: str | None) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets" if namespace else "/api/v1/secrets"


def _delete_options(uid: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}


def _uncounted(verb: str, namespace: str, resource: str) -> None:
    pass


class Kube:
    # every request this client sends, counted where all of them pass (the typed APIs and the plain ones); the
    # operator counts, the CLI's subclass (which skips this __init__) does not
    on_request: Callable[[str, str, str], None] = staticmethod(_uncounted)

    def __init__(self, api_client: client.ApiClient, threads: int = 16) -> None:
        self.api_client = api_client
        send = api_client.call_api

        def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            self.on_request(method, *request_target(url))
            return send(method, url, *args, **kwargs)

        api_client.call_api = counted  # type: ignore[method-assign]
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._first = ThreadPoolExecutor(max_workers=FIRST_THREADS, thread_name_prefix="kube-first")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def run_first(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """As `run`, on a lane of its own (FIRST_THREADS): the executor is first come, first served, and what every
        deletion of a storm waits for must not queue behind the thousands of requests those deletions send."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._first, functools.partial(fn, *args, **kwargs))

    def _send(self, method: str, path: str, body: bytes | None, content_type: str, preload: bool = True,
              timeout: Any = None) -> Any:
        """One HTTP request on the client's connection pool (its TLS, proxy and retry settings), counted."""
        headers = {"Accept": JSON, "Content-Type": content_type}
        self.api_client.update_params_for_auth(headers, [], ["BearerToken"], path, method, body)
        url = self.api_client.configuration.host + path
        self.on_request(method, *request_target(url))
        return self.api_client.rest_client.pool_manager.request(method, url, body=body, headers=headers,
                                                                preload_content=preload, timeout=timeout)

    def _request(self, method: str, path: str, body: Any = None, content_type: str = JSON, echo: bool = False) -> Any:
        """One request with plain JSON in and out: the typed APIs' model (de)serialisation and argument validation
        cost more CPU than the request itself on the hot path. Errors raise ApiException, as the typed APIs do.
        Only a GET's answer is parsed: a write's echo of the object (a whole Secret) is looked at only on `echo`."""
        response = self._send(method, path, json.dumps(body).encode() if body is not None else None, content_type)
        data = response.data
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason,
                               body=data.decode(errors="replace") if data else "")
        return json.loads(data) if data and (method == "GET" or echo) else None

    # --- list and watch, plain (the hot resources are followed outside kopf: controller/watching.py) ------------

    def list_objects(self, path: str, label_selector: str | None = None,
                     page: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object of a collection (paged: a bounded response each time) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        cont = ""
        version = ""
        while True:
            query = {"limit": str(page), **({"continue": cont} if cont else {}),
                     **({"labelSelector": label_selector} if label_selector else {})}
            result = self._request_translated("GET", f"{path}?{urllib.parse.urlencode(query)}")
            items += result.get("items") or []
            meta = result.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or ""
            if not cont:
                return items, version

    def _watch_lines(self, path: str, label_selector: str | None, resource_version: str, timeout: int,
                     opened: Callable[[Any], None], skip: tuple[bytes, ...] = ()) -> Iterator[tuple[str, Any]]:
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout), **({"labelSelector": label_selector} if label_selector else {})}
        response = self._send("GET", f"{path}?{urllib.parse.urlencode(query)}", None, JSON, preload=False,
                              timeout=urllib3.Timeout(connect=10, read=timeout + 30))
        opened(response)
        try:
            if response.status != 200:
                data = response.read()
                raise _translate(ApiException(status=response.status, reason=response.reason,
                                              body=data.decode(errors="replace") if data else ""))
            for line in response:
                if not line.strip() or line.startswith(skip):  # the caller ignores these: not even parsed
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":  # 410: the version is too old to resume from
                    status = event.get("object") or {}
                    raise _translate(ApiException(status=int(status.get("code") or 500),
                                                  reason=str(status.get("reason") or ""),
                                                  body=json.dumps(status)))
                yield str(event.get("type") or ""), event.get("object") or {}
        finally:
            response.release_conn()

    async def watch_objects(self, path: str, label_selector: str | None, resource_version: str, timeout: int = 120,
                            skip: tuple[str, ...] = ()) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) as the API server sends them from `resource_version` (BOOKMARK included; event types in
        `skip` left out unparsed), until the server ends the watch (`timeout` seconds) or the caller stops. A thread
        of its own reads the stream: a watch lasts minutes and must not hold one of the executor's threads; the
        events it reads in a burst wake the event loop once. An expired version raises Gone (410)."""
        loop = asyncio.get_running_loop()
        arrived: collections.deque[Any] = collections.deque()
        wake = asyncio.Event()
        done = object()
        responses: list[Any] = []
        prefixes = tuple(f'{{"type":"{t}"'.encode() for t in skip)

        def hand_over(item: Any) -> None:
            arrived.append(item)
            if len(arrived) == 1:  # the first since the consumer last emptied it: wake it (once per burst)
                loop.call_soon_threadsafe(wake.set)

        def read() -> None:
            try:
                for item in self._watch_lines(path, label_selector, resource_version, timeout, responses.append,
                                              prefixes):
                    hand_over(item)
                hand_over(done)
            except BaseException as exc:  # handed to the consumer, which raises it
                hand_over(exc)

        reader = threading.Thread(target=read, name="kube-watch", daemon=True)
        reader.start()
        try:
            while True:
                await wake.wait()
                wake.clear()
                while arrived:
                    item = arrived.popleft()
                    if item is done:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            if reader.is_alive():  # a consumer that stops early ends the reader's blocking read
                for response in responses:
                    with contextlib.suppress(Exception):  # the reader may have released it meanwhile
                        response.shutdown() if hasattr(response, "shutdown") else response.close()

    def _request_translated(self, method: str, path: str, body: Any = None, content_type: str = JSON) -> Any:
        try:
            return self._request(method, path, body, content_type)
        except ApiException as exc:
            raise _translate(exc) from None

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return dict(self._request("GET", path))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # --- WorkloadIdentities -------------------------------------------------------------------------------------

    @api_call
    def get_workload_identity(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(_identity_path(namespace, name))

    @api_call
    def list_workload_identities(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, WORKLOAD_IDENTITIES)
        else:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, WORKLOAD_IDENTITIES)
        return list(result.get("items", []))

    @api_call
    def patch_workload_identity_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._request("PATCH", _identity_path(namespace, name) + "/status", {"status": status}, MERGE_PATCH)

    @api_call
    def patch_workload_identity_annotations(self, namespace: str, name: str,
                                            annotations: Mapping[str, str | None]) -> None:
        self._request("PATCH", _identity_path(namespace, name), {"metadata": {"annotations": dict(annotations)}},
                      MERGE_PATCH)

    @api_call
    def add_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str,
                                        current: list[str], resource_version: str) -> None:
        """Add our finalizer to the version we saw (JSON Patch `test`): never clobber another controller's."""
        ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}]
        if current:
            ops.append({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer})
        else:
            ops.append({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]})
        self._request("PATCH", _identity_path(namespace, name), ops, JSON_PATCH)

    @api_call
    def remove_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str,
                                           current: list[str]) -> None:
        index = current.index(finalizer)
        ops = [{"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
               {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
        try:
            self._request("PATCH", _identity_path(namespace, name), ops, JSON_PATCH)
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
        s = self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        if s is None:
            return ABSENT
        meta = s.get("metadata") or {}
        return SecretSnapshot(
            exists=True,
            name=meta.get("name"),
            data=_decode(s.get("data")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            owner_uids=tuple(o.get("uid") for o in meta.get("ownerReferences") or ()),
            resource_version=meta.get("resourceVersion"),
            uid=meta.get("uid"),
        )

    @api_call
    def write_secret(self, body: dict[str, Any], current: SecretSnapshot) -> None:
        """Create, or replace in one write guarded by resourceVersion: a concurrent change raises Conflict."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if not current.exists:
            self._request("POST", f"/api/v1/namespaces/{namespace}/secrets", body)
            return
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": current.resource_version}}
        self._request("PUT", f"/api/v1/namespaces/{namespace}/secrets/{name}", body)

    @api_call
    def delete_secret(self, namespace: str, name: str, uid: str) -> None:
        """Delete only that very object (uid precondition): never a same-named Secret created since."""
        try:
            self._request("DELETE", f"/api/v1/namespaces/{namespace}/secrets/{name}", _delete_options(uid))
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- ConfigMaps (trust bundles, sidecar configs) -----------------------------------------------------------

    @api_call
    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        cm = self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        if cm is None:
            return None
        meta = cm.get("metadata") or {}
        return {"data": dict(cm.get("data") or {}), "labels": dict(meta.get("labels") or {}),
                "annotations": dict(meta.get("annotations") or {}), "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion")}

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
            self._request("POST", f"/api/v1/namespaces/{namespace}/configmaps", body)
        else:
            body["metadata"]["resourceVersion"] = current["resourceVersion"]
            self._request("PUT", f"/api/v1/namespaces/{namespace}/configmaps/{name}", body)

    @api_call
    def update_owned_configmap(self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str],
                               annotations: Mapping[str, str]) -> str:
        """Replace a ConfigMap's data, labels and annotations (as `write_configmap` over a read does) in one JSON
        Patch whose first op tests the managed-by label, with no read first: a ConfigMap meshtls does not own is
        never written (422 ApiError), a missing one raises NotFound. Returns the resourceVersion written."""
        managed_by = LABEL_MANAGED_BY.replace("~", "~0").replace("/", "~1")  # a JSON Pointer segment
        ops = [{"op": "test", "path": f"/metadata/labels/{managed_by}", "value": MANAGED_BY},
               {"op": "add", "path": "/metadata/labels", "value": dict(labels)},
               {"op": "add", "path": "/metadata/annotations", "value": dict(annotations)},
               {"op": "add", "path": "/data", "value": dict(data)}]
        echo = self._request("PATCH", f"/api/v1/namespaces/{namespace}/configmaps/{name}", ops, JSON_PATCH, echo=True)
        return str(echo["metadata"]["resourceVersion"])

    @api_call
    def delete_configmap(self, namespace: str, name: str, uid: str | None) -> None:
        """Delete only that very object (uid precondition): never a same-named ConfigMap created since."""
        try:
            self._request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                          _delete_options(uid) if uid else None)
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
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved.get("namespace") or "default"
        name = involved["name"]
        reference = {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"), "name": name,
                     "namespace": involved.get("namespace"), "uid": involved.get("uid")}
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
            "involvedObject": {k: v for k, v in reference.items() if v is not None},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", component),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._request("POST", f"/api/v1/namespaces/{namespace}/events", event)

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
