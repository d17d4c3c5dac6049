"""The API calls the `meshtls` CLI needs beyond the operator's (`client.Kube`), and the operator's heartbeat.

Everything returns plain dicts (the API's camelCase JSON) or `SecretSnapshot`s, so the CLI renders and checks
them without knowing the client's model classes. Connection problems (refused, TLS, timeouts) are not
`ApiException`s: `connection_problem` names them in a few words so the CLI can print one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import functools
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from meshtls.api.constants import GROUP, LABEL_BUNDLE, LABEL_MANAGED_BY, MANAGED_BY, TRUST_DOMAINS, VERSION
from meshtls.api.objects import SecretSnapshot
from meshtls.kube.client import Kube, _decode, _translate, api_call, or_none

log = logging.getLogger("meshtls.heartbeat")

HEARTBEAT_LEASE = "meshtls-operator"
HEARTBEAT_INTERVAL = 10.0  # seconds between renewals
HEARTBEAT_DURATION = 30  # leaseDurationSeconds: stale after three missed renewals
KOPF_GROUP, KOPF_VERSION = "kopf.dev", "v1"
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds for every CLI request


class KubeconfigError(Exception):
    """No usable kubeconfig or context: bad input, not a cluster problem."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class CliKube(Kube):
    """`Kube` with its API groups made on first use: the client's generated API modules take seconds to import
    (CoreV1Api alone ~1.5 s), and a CLI command that reads only custom objects should not pay for them."""

    def __init__(self, api_client: client.ApiClient, threads: int = 4) -> None:  # no super(): lazy attributes
        self.api_client = api_client
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._first = self._executor

    @functools.cached_property
    def core(self) -> client.CoreV1Api:  # type: ignore[override]
        return client.CoreV1Api(self.api_client)

    @functools.cached_property
    def custom(self) -> client.CustomObjectsApi:  # type: ignore[override]
        return client.CustomObjectsApi(self.api_client)

    @functools.cached_property
    def admission(self) -> client.AdmissionregistrationV1Api:  # type: ignore[override]
        return client.AdmissionregistrationV1Api(self.api_client)

    @functools.cached_property
    def coordination(self) -> client.CoordinationV1Api:  # type: ignore[override]
        return client.CoordinationV1Api(self.api_client)


@dataclass(frozen=True)
class Connection:
    kube: Kube
    server: str  # the API server URL, for messages
    namespace: str  # the context's namespace, else "default"


# --- connecting ----------------------------------------------------------------------------------------------------


def connect_cli(kubeconfig: str | None = None, context: str | None = None,
                timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> Connection:
    """Like `client.connect`, with --context, the context's namespace, and a timeout on every request."""
    configuration = client.Configuration()
    namespace = "default"
    in_cluster = (kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST")
                  and not os.environ.get("KUBECONFIG"))
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            with contextlib.suppress(OSError), open(SERVICE_ACCOUNT_NAMESPACE) as f:
                namespace = f.read().strip() or namespace
        else:
            if kubeconfig is not None and not os.path.isfile(kubeconfig):
                raise KubeconfigError("--kubeconfig", f"{kubeconfig} does not exist")
            _contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context is not None:
                names = [c["name"] for c in _contexts or []]
                if context not in names:
                    raise KubeconfigError("--context", f"no context {context!r} in the kubeconfig "
                                                       f"(have: {', '.join(names) or 'none'})")
                active = next(c for c in _contexts if c["name"] == context)
            namespace = str(((active or {}).get("context") or {}).get("namespace") or namespace)
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                    persist_config=False)
    except KubeconfigError:
        raise
    except ConfigException as exc:
        field = "--context" if context else "--kubeconfig"
        message = str(exc).splitlines()[0] if str(exc) else "invalid kubeconfig"
        if "Invalid kube-config file. No configuration found" in message:
            message = "no kubeconfig found: set KUBECONFIG or pass --kubeconfig"
        raise KubeconfigError(field, message) from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise KubeconfigError("--kubeconfig", f"unreadable kubeconfig: {exc}") from None
    configuration.retries = 1  # a refused connection should fail in a second, not after urllib3's 3 retries
    api_client = client.ApiClient(configuration)
    # Every request gets a timeout: a black-holed API server must not hang the CLI. Watches pass their own.
    api_client.rest_client.pool_manager.connection_pool_kw["timeout"] = urllib3.Timeout(
        connect=timeout[0], read=timeout[1])
    return Connection(CliKube(api_client), str(configuration.host), namespace)


def connection_problem(exc: BaseException) -> str | None:
    """A few words for an exception that means the API server could not be reached; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib3.exceptions.MaxRetryError) and current.reason is not None:
            current = current.reason
            continue
        if isinstance(current, urllib3.exceptions.SSLError | ssl.SSLError):
            text = str(current)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                return "TLS certificate verification failed"
            return f"TLS error: {text.splitlines()[0][:120]}"
        # NewConnectionError is a ConnectTimeoutError subclass in urllib3 2: test it first
        if isinstance(current, urllib3.exceptions.NewConnectionError):
            text = str(current).lower()
            if "refused" in text:
                return "connection refused"
            if "name or service not known" in text or "nodename nor servname" in text or "resolution" in text:
                return "host name not found"
            return "cannot connect"
        if isinstance(current, urllib3.exceptions.ConnectTimeoutError | urllib3.exceptions.ReadTimeoutError |
                      TimeoutError | socket.timeout):
            return "timed out"
        if isinstance(current, urllib3.exceptions.ProtocolError):
            return "connection dropped"
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, urllib3.exceptions.HTTPError | ConnectionError | socket.gaierror):
            return str(current).splitlines()[0][:120] or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


# --- the API server itself -----------------------------------------------------------------------------------------


@api_call
def server_clock(kube: Kube) -> tuple[str, dt.datetime | None]:
    """The API server's version and its clock (the Date header of the /version response, 1 s resolution)."""
    result = client.VersionApi(kube.api_client).get_code_with_http_info()
    if isinstance(result, tuple):
        data, headers = result[0], result[2]
    else:  # newer clients return an ApiResponse
        data, headers = result.data, result.headers
    date = (headers or {}).get("Date")
    when = email.utils.parsedate_to_datetime(date).astimezone(dt.UTC) if date else None
    return str(data.git_version), when


@api_call
def read_crd(kube: Kube, name: str) -> dict[str, Any] | None:
    obj = or_none(client.ApiextensionsV1Api(kube.api_client).read_custom_resource_definition, name)
    return dict(kube.api_client.sanitize_for_serialization(obj)) if obj is not None else None


@api_call
def namespace_phases(kube: Kube) -> dict[str, str]:
    """Every namespace with its phase (Active, Terminating)."""
    return {str(n.metadata.name): str((n.status.phase if n.status else None) or "Active")
            for n in kube.core.list_namespace().items}


@api_call
def annotate_trust_domain(kube: Kube, name: str, annotations: dict[str, str | None]) -> None:
    """Set (or, with None, remove) annotations on a TrustDomain: `meshtls ca rotate` asks for a rotation so."""
    kube.custom.patch_cluster_custom_object(GROUP, VERSION, TRUST_DOMAINS, name,
                                            {"metadata": {"annotations": dict(annotations)}})


# --- Secrets and ConfigMaps in bulk (one list instead of one read per identity) ----------------------------------


def _snapshot(s: Any) -> SecretSnapshot:
    meta = s.metadata
    return SecretSnapshot(
        exists=True, name=meta.name, data=_decode(s.data), labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}), owner_uids=tuple(o.uid for o in meta.owner_references or ()),
        resource_version=meta.resource_version, uid=meta.uid,
    )


@api_call
def list_managed_secrets(kube: Kube, namespace: str | None = None) -> dict[tuple[str, str], SecretSnapshot]:
    """The Secrets meshtls manages, keyed (namespace, name)."""
    selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    if namespace:
        items = kube.core.list_namespaced_secret(namespace, label_selector=selector).items
    else:
        items = kube.core.list_secret_for_all_namespaces(label_selector=selector).items
    return {(str(s.metadata.namespace), str(s.metadata.name)): _snapshot(s) for s in items}


@api_call
def list_bundle_configmaps(kube: Kube, namespace: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """The trust bundle ConfigMaps meshtls published, keyed (namespace, name)."""
    selector = f"{LABEL_BUNDLE}=true"
    if namespace:
        items = kube.core.list_namespaced_config_map(namespace, label_selector=selector).items
    else:
        items = kube.core.list_config_map_for_all_namespaces(label_selector=selector).items
    return {(str(c.metadata.namespace), str(c.metadata.name)):
            {"data": dict(c.data or {}), "labels": dict(c.metadata.labels or {})} for c in items}


# --- Events --------------------------------------------------------------------------------------------------------


@api_call
def object_events(kube: Kube, namespace: str, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    """core/v1 Events about one object, as dicts (camelCase)."""
    selector = f"involvedObject.name={name}" + (f",involvedObject.kind={kind}" if kind else "")
    items = kube.core.list_namespaced_event(namespace, field_selector=selector).items
    return [dict(kube.api_client.sanitize_for_serialization(e)) for e in items]


def watch_events(kube: Kube, namespace: str | None, field_selector: str | None = None,
                 server_timeout: int = 290) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type, event) for each Event created or updated from now on; re-lists and carries on when the watch expires.

    Runs until the caller stops iterating (or Ctrl-C); each watch request is bounded by `server_timeout`.
    """

    def lister(**kwargs: Any) -> Any:
        if namespace:
            return kube.core.list_namespaced_event(namespace, field_selector=field_selector, **kwargs)
        return kube.core.list_event_for_all_namespaces(field_selector=field_selector, **kwargs)

    def current_version() -> str:
        try:
            return str(lister(limit=1).metadata.resource_version)
        except ApiException as exc:
            raise _translate(exc) from None

    version = current_version()
    while True:
        w = watch.Watch()
        try:
            for item in w.stream(lister, resource_version=version, timeout_seconds=server_timeout,
                                 allow_watch_bookmarks=True,
                                 _request_timeout=(DEFAULT_TIMEOUT[0], server_timeout + 30)):
                raw = item.get("raw_object") or {}
                kind = item.get("type", "")
                rv = (raw.get("metadata") or {}).get("resourceVersion")
                if rv:
                    version = str(rv)
                if kind in ("ADDED", "MODIFIED"):
                    yield kind, raw
        except ApiException as exc:
            if exc.status == 410:  # too old: start again from now
                version = current_version()
                continue
            raise _translate(exc) from None
        finally:
            w.stop()


# --- the operator's liveness: a heartbeat Lease, and kopf's peering objects ---------------------------------------


def _micro_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@api_call
def read_lease(kube: Kube, namespace: str, name: str = HEARTBEAT_LEASE) -> dict[str, Any] | None:
    obj = or_none(kube.coordination.read_namespaced_lease, name, namespace)
    return dict(kube.api_client.sanitize_for_serialization(obj)) if obj is not None else None


@api_call
def renew_heartbeat_lease(kube: Kube, namespace: str, holder: str, name: str = HEARTBEAT_LEASE,
                          duration_seconds: int = HEARTBEAT_DURATION, now: dt.datetime | None = None) -> None:
    """Create or renew the Lease `namespace/name` that says "the operator `holder` is alive" until renewTime+duration.

    A heartbeat, not an election: the last writer wins. Two racing writers get a Conflict; the next beat fixes it.
    """
    now = now or dt.datetime.now(dt.UTC)
    body: dict[str, Any] = {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": int(duration_seconds),
                 "renewTime": _micro_time(now)},
    }
    try:
        current = kube.coordination.read_namespaced_lease(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body["spec"]["acquireTime"] = _micro_time(now)
        kube.coordination.create_namespaced_lease(namespace, body)
        return
    spec = current.spec
    same_holder = spec is not None and spec.holder_identity == holder and spec.acquire_time is not None
    body["spec"]["acquireTime"] = _micro_time(spec.acquire_time) if same_holder else _micro_time(now)
    body["metadata"]["resourceVersion"] = current.metadata.resource_version
    kube.coordination.replace_namespaced_lease(name, namespace, body)


@api_call
def release_heartbeat_lease(kube: Kube, namespace: str, holder: str, name: str = HEARTBEAT_LEASE) -> None:
    """On a clean shutdown: clear the holder, so `meshtls check` says "stopped" at once instead of after 30 s."""
    current = or_none(kube.coordination.read_namespaced_lease, name, namespace)
    if current is None or current.spec is None or current.spec.holder_identity != holder:
        return  # another replica beats now
    kube.coordination.patch_namespaced_lease(name, namespace, {"spec": {"holderIdentity": None}})


async def run_heartbeat(kube: Kube, namespace: str, holder: str, name: str = HEARTBEAT_LEASE,
                        interval: float = HEARTBEAT_INTERVAL, duration_seconds: int = HEARTBEAT_DURATION) -> None:
    """Renew the heartbeat Lease every `interval` seconds until cancelled; then release it. Never raises."""
    try:
        while True:
            try:
                await kube.run(renew_heartbeat_lease, kube, namespace, holder, name, duration_seconds)
            except Exception as exc:  # a missed beat is reported by `meshtls check`, not fatal here
                log.warning("could not renew the heartbeat Lease %s/%s: %s", namespace, name, exc)
            await asyncio.sleep(interval)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(kube.run(release_heartbeat_lease, kube, namespace, holder, name), 5)
        raise


def default_holder() -> str:
    """The pod name in a cluster (HOSTNAME), else host:pid for a local run."""
    return os.environ.get("HOSTNAME") or f"{socket.gethostname()}:{os.getpid()}"


@api_call
def kopf_peerings(kube: Kube, name: str) -> list[dict[str, Any]]:
    """kopf's peering objects named `name`: the ClusterKopfPeering (a cluster-wide operator) and every namespace's
    KopfPeering (a namespaced one keeps one per served namespace). Empty when absent or kopf's CRDs are not there."""
    found: list[dict[str, Any]] = []
    try:
        found.append(dict(kube.custom.get_cluster_custom_object(KOPF_GROUP, KOPF_VERSION, "clusterkopfpeerings",
                                                                name)))
    except ApiException as exc:
        if exc.status != 404:
            raise
    try:
        items = kube.custom.list_cluster_custom_object(KOPF_GROUP, KOPF_VERSION, "kopfpeerings",
                                                       field_selector=f"metadata.name={name}").get("items", [])
    except ApiException as exc:
        if exc.status != 404:
            raise
        items = []
    found.extend(dict(i) for i in items)
    return found
