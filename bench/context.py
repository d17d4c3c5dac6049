"""The cluster side of a run: the local control plane, the CRDs, the operator process, a trust domain, and
helpers to create identities in bulk and watch them become Ready."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e.harness import Cluster
from e2e.operator_process import OperatorProcess

from bench.common import WID_PATH, Knobs, Rest, say
from meshtls.pki import load_certificates, verify_svid

REPO = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "bench.meshtls.test"
OPERATOR_NAMESPACE = "meshtls-system"


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


class ReadyTracker:
    """One cluster-wide watch on WorkloadIdentities: when each first turned Ready, and when each was deleted."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest
        self.ready_at: dict[tuple[str, str], float] = {}
        self.deleted_at: dict[tuple[str, str], float] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.changed = threading.Condition(threading.RLock())
        self.closed = False
        self.rewatches = 0
        self.watch = self._list_and_watch()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _list_and_watch(self) -> Any:
        listing = self.rest.get(f"{WID_PATH}/workloadidentities")
        now = time.time()
        seen = set()
        for obj in listing.get("items", []):
            self._see("ADDED", obj, now)
            seen.add((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        with self.changed:
            for key in list(self.objects):
                if key not in seen:
                    self._see("DELETED", self.objects[key], now)
        return self.rest.watch(f"{WID_PATH}/workloadidentities", listing["metadata"]["resourceVersion"])

    def _see(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self.changed:
            if kind == "DELETED":
                self.deleted_at.setdefault(key, now)
                self.objects.pop(key, None)
            else:
                self.objects[key] = obj
                if key not in self.ready_at and is_ready(obj):
                    self.ready_at[key] = now
            self.changed.notify_all()

    def _pump(self) -> None:
        while not self.closed:
            for event in self.watch:
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self._see(event["type"], event["object"], time.time())
            if not self.closed:  # the server ended it (or it expired): list again, watch again
                self.rewatches += 1
                self.watch = self._list_and_watch()

    def wait(self, what: str, done: Any, timeout: float, progress: Any = None) -> bool:
        """Wait until done() (called under the lock); prints progress() every few seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        with self.changed:
            while not done():
                if time.monotonic() > deadline:
                    say(f"timed out waiting for {what}")
                    return False
                self.changed.wait(0.5)
                if progress is not None and time.monotonic() - last > 5:
                    last = time.monotonic()
                    say(f"  {what}: {progress()}")
        return True

    def close(self) -> None:
        self.closed = True
        self.watch.close()


@dataclass
class Bench:
    knobs: Knobs
    out: Path
    cluster: Cluster | None = None
    rest: Rest | None = None
    operator: OperatorProcess | None = None
    tracker: ReadyTracker | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    results: dict[str, Any] = field(default_factory=dict)

    # --- cluster ---------------------------------------------------------------------------------------------------

    def start_cluster(self) -> None:
        from e2e.harness.paths import cache_dir, state_dir

        # a bench-only state dir: start from a clean control plane (no objects left by an earlier run)
        fresh = state_dir() != cache_dir() / "cluster" and os.environ.get("MESHTLS_BENCH_REUSE_CLUSTER") != "1"
        if fresh and Cluster.down(log=lambda m: say(f"  {m}")):
            say(f"stopped the cluster left in {state_dir()}")
        say(f"starting the local control plane in {state_dir()}")
        self.cluster = Cluster.start(cleanup_on_exit=True, log=lambda m: say(f"  {m}"))
        self.rest = Rest(self.cluster.kubeconfig)
        self.cluster.kubectl("apply", "-f", str(REPO / "crds"))
        self.cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                             "crd/trustdomains.meshtls.dev", "crd/workloadidentities.meshtls.dev")
        self.namespace(OPERATOR_NAMESPACE)
        self.tracker = ReadyTracker(self.rest)

    def component_pids(self) -> dict[str, int]:
        assert self.cluster is not None
        return {p.name: p.pid for p in self.cluster.processes if p.name in ("kube-apiserver", "etcd")}

    def namespace(self, name: str) -> str:
        assert self.rest is not None
        self.rest.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": name, "labels": {"bench": "meshtls"}}},
                       ok=(201, 409))
        return name

    def start_operator(self) -> OperatorProcess:
        assert self.cluster is not None
        say("starting the meshtls operator")
        from e2e.operator_process import free_port

        # as installed: with its webhook, which sets the finalizer at admission (Ignore: never blocks a create)
        self.operator = OperatorProcess(self.cluster.kubeconfig, self.out, name="operator", extra_args=[
            "--webhook-port", str(free_port()), "--webhook-failure-policy", "Ignore"])
        self.operator.start(timeout=60)
        return self.operator

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self.operator is not None:
            self.operator.stop()
        if self.cluster is not None:
            say("stopping the control plane" if self.cluster.owned else "leaving the reused control plane running")
            self.cluster.stop()

    def trust_domain(self) -> None:
        assert self.rest is not None
        body = {"apiVersion": "meshtls.dev/v1alpha1", "kind": "TrustDomain", "metadata": {"name": TRUST_DOMAIN},
                "spec": {"certificates": {"minTTL": "10s", "defaultTTL": "1h"}}}
        self.rest.call("POST", f"{WID_PATH}/trustdomains", body, ok=(201, 409))
        deadline = time.monotonic() + 60
        while not is_ready(self.rest.get(f"{WID_PATH}/trustdomains/{TRUST_DOMAIN}")):
            if time.monotonic() > deadline:
                raise RuntimeError("the bench TrustDomain did not become Ready in 60 s")
            time.sleep(0.2)

    # --- identities in bulk ----------------------------------------------------------------------------------------

    def create_identities(self, keys: list[tuple[str, str]], spec: dict[str, Any]) -> dict[tuple[str, str], float]:
        """POST WorkloadIdentities from `knobs.workers` threads; returns when each POST returned (time.time())."""
        assert self.rest is not None
        rest = self.rest
        created: dict[tuple[str, str], float] = {}

        def one(key: tuple[str, str]) -> None:
            ns, name = key
            body = {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"serviceAccountName": name, **spec}}
            rest.call("POST", f"{WID_PATH}/namespaces/{ns}/workloadidentities", body)
            created[key] = time.time()

        with ThreadPoolExecutor(self.knobs.workers) as pool:
            list(pool.map(one, keys))
        return created

    def delete_identities(self, keys: list[tuple[str, str]]) -> None:
        assert self.rest is not None
        rest = self.rest

        def one(key: tuple[str, str]) -> None:
            ns, name = key
            rest.call("DELETE", f"{WID_PATH}/namespaces/{ns}/workloadidentities/{name}", ok=(200, 202, 404))

        with ThreadPoolExecutor(self.knobs.workers) as pool:
            list(pool.map(one, keys))

    def verify_secrets(self, keys: list[tuple[str, str]], trust_domain: str) -> dict[str, int]:
        """Each Secret: kubernetes.io/tls, a chain that verifies to its ca.crt, the expected SPIFFE ID."""
        import base64

        assert self.rest is not None
        now = dt.datetime.now(dt.UTC)
        by_ns: dict[str, set[str]] = {}
        for ns, name in keys:
            by_ns.setdefault(ns, set()).add(name)
        valid = invalid = 0
        for ns, names in by_ns.items():
            items = self.rest.get(f"/api/v1/namespaces/{ns}/secrets")["items"]
            for s in items:
                owner = s["metadata"].get("name", "").removesuffix("-mtls")
                if owner not in names:
                    continue
                data = {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
                try:
                    chain = load_certificates(data["tls.crt"])
                    roots = load_certificates(data["ca.crt"])
                    v = verify_svid(chain, roots, now)
                    good = v.reason is None and str(v.spiffe_id) == \
                        f"spiffe://{trust_domain}/ns/{ns}/sa/{owner}" and s.get("type") == "kubernetes.io/tls" \
                        and bool(data.get("tls.key"))
                except Exception:
                    good = False
                valid += good
                invalid += not good
        return {"valid": valid, "invalid": invalid, "missing": len(keys) - valid - invalid}
