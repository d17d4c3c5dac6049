"""One in-memory stand-in for `meshtls.kube.Kube`, for controller unit tests (never for e2e: those use the real
control plane).

It answers the calls `handlers.reconcile` and `handlers.trust` make, with the API server's semantics where the
controller depends on them: every write bumps a resourceVersion; a create over an existing object and a replace
from a stale read raise `Conflict` (409); a delete with a stale uid precondition raises `Conflict`; a missing
object reads as None / ABSENT and patches of it raise `NotFound` (404); a JSON-patch `test` that fails raises
`ApiError(422)`; a create in a namespace in `terminating` raises the API's 403; an object with finalizers is
only marked deleted, and goes when its last finalizer does.

Every call is recorded in `calls` (method name, arguments) so tests can count writes and check what was read.
`failures[method]` holds exceptions the next calls of that method raise (one per call), for error paths.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from meshtls.api.constants import LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.objects import ABSENT, SecretSnapshot
from meshtls.kube.client import ApiError, Conflict, NotFound

T = TypeVar("T")
Key = tuple[str, str]
WRITES = frozenset({"write_secret", "write_opaque_secret", "delete_secret", "write_configmap", "delete_configmap",
                    "update_owned_configmap",
                    "patch_workload_identity_status", "patch_workload_identity_annotations",
                    "add_workload_identity_finalizer", "remove_workload_identity_finalizer",
                    "patch_trust_domain_status", "post_event"})


def _recorded(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(self: FakeKube, *args: Any, **kwargs: Any) -> T:
        self.calls.append((fn.__name__, args))
        queued = self.failures.get(fn.__name__)
        if queued:
            raise queued.pop(0)
        return fn(self, *args, **kwargs)

    return wrapper


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a merge patch: objects merge, None deletes, lists replace."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class FakeKube:
    """Secrets, ConfigMaps, WorkloadIdentities, TrustDomains, Events and namespaces, over dicts."""

    def __init__(self) -> None:
        self.secrets: dict[Key, SecretSnapshot] = {}
        self.configmaps: dict[Key, dict[str, Any]] = {}
        self.identities: dict[Key, dict[str, Any]] = {}
        self.trust_domains: dict[str, dict[str, Any]] = {}
        self.namespaces: dict[str, dict[str, str]] = {}  # name -> labels; a namespace absent here exists too
        self.terminating: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.failures: dict[str, list[Exception]] = {}
        self._rv = itertools.count(1)
        self._uid = itertools.count(1)

    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _creating_in(self, namespace: str) -> None:
        """A namespace being deleted takes no new objects (updates and deletes still work)."""
        if namespace in self.terminating:
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {namespace} because it is "
                                             "being terminated")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        await asyncio.sleep(0)  # the real one runs in a thread: other coroutines get their turn
        return fn(*args, **kwargs)

    run_first = run  # the real one's own lane: the same calls, on other threads

    # --- what tests ask -----------------------------------------------------------------------------------------

    def count(self, method: str, *prefix: Any) -> int:
        """How many calls of `method` whose first arguments are `prefix`."""
        return sum(1 for name, args in self.calls if name == method and args[:len(prefix)] == prefix)

    def writes(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [(name, args) for name, args in self.calls if name in WRITES]

    def reasons(self, name: str | None = None, type_: str | None = None) -> list[str]:
        """Event reasons in order, about the object `name` (any when None), of `type_` (any when None)."""
        return [e["reason"] for e in self.events
                if (name is None or e["involved"].get("name") == name) and (type_ is None or e["type"] == type_)]

    def put_secret(self, namespace: str, name: str, data: Mapping[str, bytes], labels: Mapping[str, str] | None = None,
                   annotations: Mapping[str, str] | None = None, owner_uids: tuple[str, ...] = ()) -> SecretSnapshot:
        """A Secret created by someone else (a user, an earlier run): not recorded as a call."""
        snap = SecretSnapshot(True, name, dict(data), dict(labels or {}), dict(annotations or {}), owner_uids,
                              self._next_rv(), f"secret-{next(self._uid)}")
        self.secrets[(namespace, name)] = snap
        return snap

    def put_identity(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", f"wi-{next(self._uid)}")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = self._next_rv()
        self.identities[(meta["namespace"], meta["name"])] = copy.deepcopy(body)
        return copy.deepcopy(body)

    def delete_identity(self, namespace: str, name: str, when: str = "2026-11-30T12:00:00Z") -> dict[str, Any] | None:
        """kubectl delete: marked deleted while finalizers remain, gone otherwise. Returns what a watch sees."""
        body = self.identities.get((namespace, name))
        if body is None:
            return None
        if body["metadata"].get("finalizers"):
            body["metadata"]["deletionTimestamp"] = when
            body["metadata"]["resourceVersion"] = self._next_rv()
            return copy.deepcopy(body)
        del self.identities[(namespace, name)]
        return copy.deepcopy(body)

    # --- WorkloadIdentities ---------------------------------------------------------------------------------------

    def _identity(self, namespace: str, name: str) -> dict[str, Any]:
        body = self.identities.get((namespace, name))
        if body is None:
            raise NotFound(f"workloadidentities {namespace}/{name} not found")
        return body

    @_recorded
    def get_workload_identity(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.identities.get((namespace, name))
        return copy.deepcopy(body) if body is not None else None

    @_recorded
    def list_workload_identities(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for (ns, _), b in sorted(self.identities.items()) if namespace in (None, ns)]

    @_recorded
    def patch_workload_identity_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        body = self._identity(namespace, name)
        body["status"] = merge_patch(body.get("status") or {}, status)
        body["metadata"]["resourceVersion"] = self._next_rv()

    @_recorded
    def patch_workload_identity_annotations(self, namespace: str, name: str,
                                            annotations: Mapping[str, str | None]) -> None:
        body = self._identity(namespace, name)
        body["metadata"]["annotations"] = merge_patch(body["metadata"].get("annotations") or {}, annotations)
        body["metadata"]["resourceVersion"] = self._next_rv()

    @_recorded
    def add_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str, current: list[str],
                                        resource_version: str) -> None:
        body = self._identity(namespace, name)
        if body["metadata"]["resourceVersion"] != resource_version:
            raise ApiError(422, "Invalid", "the server rejected our request due to an error in our request")
        body["metadata"]["finalizers"] = [*(body["metadata"].get("finalizers") or []), finalizer]
        body["metadata"]["resourceVersion"] = self._next_rv()

    @_recorded
    def remove_workload_identity_finalizer(self, namespace: str, name: str, finalizer: str,
                                           current: list[str]) -> None:
        body = self.identities.get((namespace, name))
        if body is None:
            return  # 404 is success: the object is gone already
        finalizers = list(body["metadata"].get("finalizers") or [])
        index = current.index(finalizer)
        if index >= len(finalizers) or finalizers[index] != finalizer:
            raise ApiError(422, "Invalid", "the server rejected our request due to an error in our request")
        del finalizers[index]
        body["metadata"]["finalizers"] = finalizers
        body["metadata"]["resourceVersion"] = self._next_rv()
        if not finalizers and body["metadata"].get("deletionTimestamp"):
            del self.identities[(namespace, name)]

    @_recorded
    def read_peering_status(self, name: str, namespace: str | None) -> dict[str, Any]:
        return {}

    # --- TrustDomains ---------------------------------------------------------------------------------------------

    @_recorded
    def get_trust_domain(self, name: str) -> dict[str, Any] | None:
        body = self.trust_domains.get(name)
        return copy.deepcopy(body) if body is not None else None

    @_recorded
    def list_trust_domains(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(b) for _, b in sorted(self.trust_domains.items())]

    @_recorded
    def patch_trust_domain_status(self, name: str, status: dict[str, Any]) -> None:
        body = self.trust_domains.get(name)
        if body is None:
            raise NotFound(f"trustdomains {name} not found")
        body["status"] = merge_patch(body.get("status") or {}, status)

    # --- Secrets --------------------------------------------------------------------------------------------------

    @_recorded
    def read_secret(self, namespace: str, name: str) -> SecretSnapshot:
        return self.secrets.get((namespace, name), ABSENT)

    def _store_secret(self, namespace: str, name: str, current: SecretSnapshot, data: Mapping[str, bytes],
                      labels: Mapping[str, str], annotations: Mapping[str, str], owner_uids: tuple[str, ...]) -> None:
        existing = self.secrets.get((namespace, name))
        if not current.exists:
            if existing is not None:
                raise Conflict(f"secrets {name!r} already exists")
            self._creating_in(namespace)
            uid = f"secret-{next(self._uid)}"
        else:
            if existing is None:
                raise NotFound(f"secrets {name!r} not found")
            if existing.resource_version != current.resource_version:
                raise Conflict(f"the object has been modified: secrets {name!r}")
            uid = existing.uid or f"secret-{next(self._uid)}"
        self.secrets[(namespace, name)] = SecretSnapshot(True, name, dict(data), dict(labels), dict(annotations),
                                                         owner_uids, self._next_rv(), uid)

    @_recorded
    def write_secret(self, body: dict[str, Any], current: SecretSnapshot) -> None:
        meta = body["metadata"]
        data = {k: v.encode() for k, v in (body.get("stringData") or {}).items()}
        self._store_secret(meta["namespace"], meta["name"], current, data, meta.get("labels") or {},
                           meta.get("annotations") or {}, tuple(o["uid"] for o in meta.get("ownerReferences") or ()))

    @_recorded
    def write_opaque_secret(self, namespace: str, name: str, data: Mapping[str, bytes], labels: Mapping[str, str],
                            current: SecretSnapshot) -> None:
        self._store_secret(namespace, name, current, data, labels, {}, ())

    @_recorded
    def delete_secret(self, namespace: str, name: str, uid: str) -> None:
        existing = self.secrets.get((namespace, name))
        if existing is None:
            return  # 404 is success
        if existing.uid != uid:
            raise Conflict(f"Precondition failed: UID in precondition: {uid}, UID in object meta: {existing.uid}")
        del self.secrets[(namespace, name)]

    # --- ConfigMaps -----------------------------------------------------------------------------------------------

    @_recorded
    def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        cm = self.configmaps.get((namespace, name))
        return copy.deepcopy(cm) if cm is not None else None

    @_recorded
    def write_configmap(self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str],
                        current: dict[str, Any] | None, owner: Mapping[str, Any] | None = None,
                        annotations: Mapping[str, str] | None = None) -> None:
        existing = self.configmaps.get((namespace, name))
        if current is None:
            if existing is not None:
                raise Conflict(f"configmaps {name!r} already exists")
            self._creating_in(namespace)
            uid = f"cm-{next(self._uid)}"
        else:
            if existing is None:
                raise NotFound(f"configmaps {name!r} not found")
            if existing["resourceVersion"] != current["resourceVersion"]:
                raise Conflict(f"the object has been modified: configmaps {name!r}")
            uid = existing["uid"]
        self.configmaps[(namespace, name)] = {"data": dict(data), "labels": dict(labels),
                                              "annotations": dict(annotations or {}), "uid": uid,
                                              "resourceVersion": self._next_rv(),
                                              "owner": dict(owner) if owner is not None else None}

    @_recorded
    def update_owned_configmap(self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str],
                               annotations: Mapping[str, str]) -> str:
        """The JSON Patch: its `test` of the managed-by label fails with 422, a missing object is a 404."""
        existing = self.configmaps.get((namespace, name))
        if existing is None:
            raise NotFound(f"configmaps {name!r} not found")
        if existing["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise ApiError(422, "Invalid", "the server rejected our request due to an error in our request")
        self.configmaps[(namespace, name)] = {**existing, "data": dict(data), "labels": dict(labels),
                                              "annotations": dict(annotations), "resourceVersion": self._next_rv()}
        return str(self.configmaps[(namespace, name)]["resourceVersion"])

    @_recorded
    def delete_configmap(self, namespace: str, name: str, uid: str | None) -> None:
        existing = self.configmaps.get((namespace, name))
        if existing is None:
            return
        if uid is not None and existing["uid"] != uid:
            raise Conflict(f"Precondition failed: UID in precondition: {uid}, UID in object meta: {existing['uid']}")
        del self.configmaps[(namespace, name)]

    # --- Namespaces and Events ------------------------------------------------------------------------------------

    @_recorded
    def list_namespaces(self, label_selector: str | None = None) -> list[str]:
        wanted = dict(p.split("=", 1) for p in (label_selector or "").split(",") if p)
        return sorted(n for n, labels in self.namespaces.items() if wanted.items() <= labels.items())

    @_recorded
    def namespace_exists(self, name: str) -> bool:
        return name not in self.terminating

    @_recorded
    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str,
                   component: str = "meshtls-operator") -> None:
        self._creating_in(involved.get("namespace") or "default")
        self.events.append({"involved": dict(involved), "type": type_, "reason": reason, "message": message[:1024]})
