"""The floor: the least any issuer must do per WorkloadIdentity, as its own process (its CPU is measured apart).

For each WorkloadIdentity added in one namespace: mint a key and an X509-SVID (the same `meshtls.pki` code the
operator uses), create the kubernetes.io/tls Secret (one POST) and write a Ready status (one PATCH). No reads
beyond the watch, no events, no finalizer, no bookkeeping annotations. Same number of worker threads as the
operator's API executor; keep-alive connections, no client-side models.

    python -m bench.floor --kubeconfig K --namespace NS --workers 16 --expect N
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import queue
import sys
import threading
from pathlib import Path

from bench.common import WID_PATH, Rest, Watch
from meshtls.pki import generate_ca, issue_svid, workload_spiffe_id

TRUST_DOMAIN = "floor.meshtls.test"


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--expect", type=int, required=True)
    args = p.parse_args(argv)
    rest = Rest(Path(args.kubeconfig))
    ca = generate_ca(TRUST_DOMAIN, dt.datetime.now(dt.UTC))
    ns = args.namespace
    work: queue.Queue[dict | None] = queue.Queue()
    done = threading.Semaphore(0)

    def worker() -> None:
        while True:
            obj = work.get()
            if obj is None:
                return
            name = obj["metadata"]["name"]
            sa = obj["spec"]["serviceAccountName"]
            now = dt.datetime.now(dt.UTC)
            cert = issue_svid(ca, workload_spiffe_id(TRUST_DOMAIN, ns, sa), now, dt.timedelta(hours=1))
            secret = {
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": f"{name}-mtls", "namespace": ns,
                             "labels": {"app.kubernetes.io/managed-by": "bench-floor"},
                             "ownerReferences": [{"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": name,
                                                  "uid": obj["metadata"]["uid"]}]},
                "data": {"tls.crt": base64.b64encode(cert.cert_chain_pem).decode(),
                         "tls.key": base64.b64encode(cert.key_pem).decode(),
                         "ca.crt": base64.b64encode(cert.ca_pem).decode()},
            }
            rest.call("POST", f"/api/v1/namespaces/{ns}/secrets", secret, ok=(201, 409))
            status = {"status": {
                "serialNumber": cert.serial_hex, "notAfter": _iso(cert.not_after), "secretName": f"{name}-mtls",
                "conditions": [{"type": "Ready", "status": "True", "reason": "Issued", "message": "floor",
                                "lastTransitionTime": _iso(now)}]}}
            rest.call("PATCH", f"{WID_PATH}/namespaces/{ns}/workloadidentities/{name}/status", status,
                      content_type="application/merge-patch+json")
            done.release()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    seen: set[str] = set()
    state = {"closed": False, "rewatches": 0}

    def list_and_watch() -> Watch:
        listing = rest.get(f"{WID_PATH}/namespaces/{ns}/workloadidentities")
        for obj in listing["items"]:
            if obj["metadata"]["name"] not in seen and not obj.get("status"):
                seen.add(obj["metadata"]["name"])
                work.put(obj)
        return rest.watch(f"{WID_PATH}/namespaces/{ns}/workloadidentities", listing["metadata"]["resourceVersion"])

    watch = list_and_watch()

    def pump() -> None:
        nonlocal watch
        while not state["closed"]:
            for event in watch:
                obj = event.get("object") or {}
                name = (obj.get("metadata") or {}).get("name")
                if event.get("type") == "ADDED" and name not in seen:
                    seen.add(name)
                    work.put(obj)
            if not state["closed"]:  # the apiserver drops a watcher that falls behind: list again, like an informer
                state["rewatches"] += 1
                watch = list_and_watch()

    threading.Thread(target=pump, daemon=True).start()
    print("floor: watching", flush=True)
    for _ in range(args.expect):
        done.acquire()
    state["closed"] = True
    watch.close()
    for _ in threads:
        work.put(None)
    print(f"floor: {args.expect} issued ({state['rewatches']} re-watches)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
