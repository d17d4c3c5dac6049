"""Section 3: delete N identities at once; time until every serial is on every bundle's CRL, and the CRL writes.

A watch on the trust bundle ConfigMaps (label meshtls.dev/bundle=true) parses each new crl.pem as it lands, so the
clock stops at the first moment every bundle lists every serial the deleted identities held (status.activeSerials).
CRL writes: ConfigMap PUT/POST from apiserver_request_total, and the operator's meshtls_crl_publications_total.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cryptography import x509

from bench.common import diff_counts, prom_value, request_counts, say, split_rw
from bench.context import Bench
from bench.issuance import RESOURCES

BUNDLE_SELECTOR = "meshtls.dev%2Fbundle%3Dtrue"
CONFIGMAP_WRITES = ("PUT configmaps", "POST configmaps", "PATCH configmaps")  # a bundle meshtls wrote is patched


def _crl_serials(pem: str) -> set[int]:
    out: set[int] = set()
    for block in pem.split("-----END X509 CRL-----")[:-1]:
        text = block[block.index("-----BEGIN X509 CRL-----"):] + "-----END X509 CRL-----\n"
        crl = x509.load_pem_x509_crl(text.encode())
        out.update(r.serial_number for r in crl)
    return out


class BundleWatch:
    """Latest CRL serials per bundle ConfigMap, and when each first covered a wanted set."""

    def __init__(self, bench: Bench) -> None:
        assert bench.rest is not None
        self.rest = bench.rest
        self.cond = threading.Condition()
        self.serials: dict[tuple[str, str], set[int]] = {}
        self.sizes: dict[tuple[str, str], int] = {}
        self.updates = 0
        listing = self.rest.get(f"/api/v1/configmaps?labelSelector={BUNDLE_SELECTOR}")
        for cm in listing["items"]:
            self._see(cm)
        self.watch = self.rest.watch(f"/api/v1/configmaps?labelSelector={BUNDLE_SELECTOR}",
                                     listing["metadata"]["resourceVersion"])
        threading.Thread(target=self._pump, daemon=True).start()

    def _see(self, cm: dict[str, Any]) -> None:
        key = (cm["metadata"]["namespace"], cm["metadata"]["name"])
        pem = (cm.get("data") or {}).get("crl.pem", "")
        serials = _crl_serials(pem)
        with self.cond:
            self.serials[key] = serials
            self.sizes[key] = len(pem)
            self.updates += 1
            self.cond.notify_all()

    def _pump(self) -> None:
        for event in self.watch:
            if event.get("type") in ("ADDED", "MODIFIED"):
                self._see(event["object"])

    def covering(self, wanted: set[int]) -> int:
        return sum(1 for s in self.serials.values() if wanted <= s)


def run(bench: Bench) -> dict[str, Any]:
    assert bench.rest is not None and bench.tracker is not None and bench.operator is not None
    tracker = bench.tracker
    keys: list[tuple[str, str]] = list(getattr(bench, "issued_keys", []))
    if not keys:
        raise RuntimeError("the revocation storm needs the issuance section's identities")
    serials: set[int] = set()
    for key in keys:
        status = (tracker.objects.get(key) or {}).get("status") or {}
        serials.update(int(e["serial"], 16) for e in status.get("activeSerials") or [])
        if status.get("serialNumber"):
            serials.add(int(status["serialNumber"], 16))
    bundles = BundleWatch(bench)
    n_bundles = len(bundles.serials)
    before = request_counts(bench.rest)
    metrics_before = bench.operator.metrics()
    say(f"revocation: deleting {len(keys)} identities ({len(serials)} serials, {n_bundles} bundles)")
    t0 = time.time()
    bench.delete_identities(keys)
    t_deleted = time.time()
    say(f"revocation: {len(keys)} DELETEs sent in {t_deleted - t0:.1f} s; waiting for every CRL")
    t_crl = None
    deadline = time.monotonic() + max(300, len(keys) * 0.5)
    last = time.monotonic()
    with bundles.cond:
        while time.monotonic() < deadline:
            if bundles.covering(serials) == len(bundles.serials) >= n_bundles:
                t_crl = time.time()
                break
            bundles.cond.wait(0.5)
            if time.monotonic() - last > 5:
                last = time.monotonic()
                best = max((len(serials & s) for s in bundles.serials.values()), default=0)
                say(f"  CRLs: {bundles.covering(serials)}/{len(bundles.serials)} bundles complete; best "
                    f"{best}/{len(serials)} serials; {len(keys) - len(set(keys) & tracker.objects.keys())} "
                    f"identities gone")
    keyset = set(keys)
    gone = tracker.wait("identities gone", lambda: not (keyset & tracker.objects.keys()),
                        timeout=max(120, len(keys) * 0.3),
                        progress=lambda: f"{len(keyset - tracker.objects.keys())}/{len(keys)} gone")
    t_gone = max((tracker.deleted_at.get(k, 0) for k in keys), default=time.time())
    time.sleep(2)
    after = request_counts(bench.rest)
    metrics_after = bench.operator.metrics()
    bundles.watch.close()
    delta = diff_counts(after, before, RESOURCES)
    delta["DELETE workloadidentities"] = delta.get("DELETE workloadidentities", 0) - len(keys)  # the bench's own
    delta = {k: v for k, v in delta.items() if v}
    reads, writes = split_rw(delta)
    left = sum(1 for ns in {k[0] for k in keys}
               for s in bench.rest.get(f"/api/v1/namespaces/{ns}/secrets")["items"]
               if s["metadata"]["name"].removesuffix("-mtls") in {k[1] for k in keys if k[0] == ns})
    publications = prom_value(metrics_after, "meshtls_crl_publications_total") - \
        prom_value(metrics_before, "meshtls_crl_publications_total")
    result = {
        "identities": len(keys),
        "serials": len(serials),
        "bundles": len(bundles.serials),
        "delete_seconds": round(t_deleted - t0, 2),
        "seconds_until_every_crl": round(t_crl - t0, 2) if t_crl else None,
        "seconds_after_last_delete": round(max(0.0, t_crl - t_deleted), 2) if t_crl else None,
        "seconds_until_all_identities_gone": round(t_gone - t0, 2) if gone else None,
        "secrets_left": left,
        "configmap_writes": sum(v for k, v in delta.items() if k in CONFIGMAP_WRITES),
        "configmap_writes_per_bundle": round(sum(v for k, v in delta.items() if k in CONFIGMAP_WRITES)
                                             / max(1, len(bundles.serials)), 1),
        "crl_publications": publications,
        "crl_pem_bytes": max(bundles.sizes.values(), default=0),
        "api_requests": delta,
        "reads_per_identity": round(reads / len(keys), 2),
        "writes_per_identity": round(writes / len(keys), 2),
        "bundle_updates_seen": bundles.updates,
        "goals": {"crl_within_5s": t_crl is not None and t_crl - t_deleted <= 5},  # issue #16's
    }
    say(f"revocation: every serial on every CRL after {result['seconds_until_every_crl']} s; all identities gone "
        f"after {result['seconds_until_all_identities_gone']} s; {result['configmap_writes']} ConfigMap writes, "
        f"{publications:.0f} CRL publications; {left} Secrets left")
    return result
