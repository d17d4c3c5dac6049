"""What one issuance costs the API server, counted on the real control plane (issue #16): 3 writes and no read with
the webhook setting the finalizer at admission; with the webhook down, the operator still finalizes the identity
itself and revocation on delete still works."""

from __future__ import annotations

import re
from collections import Counter

from cryptography import x509

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess
from meshtls.api.constants import FINALIZER
from meshtls.pki import load_certificates

# what one identity's issuance touches; leases (the heartbeat) and the trust bundles (per namespace) are not its own
PER_IDENTITY = ("workloadidentities", "workloadidentities/status", "secrets", "events")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
_SAMPLE = re.compile(r'^meshtls_api_requests_total\{([^}]*)\} ([0-9.e+]+)$')


def operator_requests(operator: OperatorProcess, scope: str = "workloads") -> Counter[tuple[str, str]]:
    """The operator's own count of what it sent into the namespaces it serves (not its own: the trust domains' state
    there is polled), by (verb, resource)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in operator.metrics().splitlines():
        if m := _SAMPLE.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels["scope"] == scope:
                counts[(labels["verb"], labels["resource"])] += int(float(m.group(2)))
    return counts


def apiserver_patches_of_identities(cluster: Cluster) -> int:
    """PATCHes of WorkloadIdentities (not their status) the API server answered, from anyone: kopf included."""
    total = 0
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="workloadidentities"' in line \
                and 'subresource=""' in line and 'verb="PATCH"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def issued(kube: Kube, namespace: str, name: str) -> bool:
    return is_ready(kube.identity(namespace, name)) and bool(kube.events(namespace, reason="Issued", name=name))


def test_an_issuance_with_the_webhook_up_is_three_writes_and_no_read(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    spec = {"trustDomain": trust_domain}
    # the namespace's first identity also creates its trust bundle: not what is measured here
    kube.create_identity(namespace, "first", {"serviceAccountName": "first", **spec})
    wait_for("the first identity issued", lambda: issued(kube, namespace, "first"), 15)
    before, patches_before = operator_requests(running_operator), apiserver_patches_of_identities(cluster)
    created = kube.create_identity(namespace, "web", {"serviceAccountName": "web", **spec})
    assert FINALIZER in (created["metadata"].get("finalizers") or []), "the webhook did not set the finalizer"
    wait_for("the identity issued (Ready and its Issued Event)", lambda: issued(kube, namespace, "web"), 15)
    delta = operator_requests(running_operator) - before
    mine = {k: v for k, v in delta.items() if k[1] in PER_IDENTITY}
    writes = sum(v for (verb, _), v in mine.items() if verb in WRITES)
    reads = sum(v for (verb, _), v in mine.items() if verb not in WRITES)
    print(f"requests for one issuance: {dict(mine)}; everything the operator sent meanwhile: {dict(delta)}")
    assert mine == {("POST", "secrets"): 1, ("PATCH", "workloadidentities/status"): 1, ("POST", "events"): 1}, mine
    assert (writes, reads) == (3, 0)
    assert apiserver_patches_of_identities(cluster) == patches_before, "someone PATCHed the identity"


def test_with_the_webhook_down_the_operator_finalizes_and_delete_still_revokes(
    kube: Kube, namespace: str, trust_domain: str, operator: OperatorProcess,
) -> None:
    operator.stop()  # its webhook with it: the finalizer rule is failurePolicy Ignore
    try:
        created = kube.create_identity(namespace, "late", {"serviceAccountName": "late", "trustDomain": trust_domain})
        assert FINALIZER not in (created["metadata"].get("finalizers") or [])
    finally:
        operator.start()
    body = wait_for("the operator to add its finalizer",
                    lambda: (b := kube.identity(namespace, "late")) and FINALIZER in b["metadata"].get(
                        "finalizers", []) and b, 30)
    # a fresh process: its counter holds what it sent since it started, the finalizer PATCH among it
    assert operator_requests(operator)[("PATCH", "workloadidentities")] >= 1
    data = wait_for("the Secret", lambda: kube.secret_data(namespace, "late-mtls"), 30)
    wait_for("Ready", lambda: is_ready(kube.identity(namespace, "late")), 15)
    serial = load_certificates(data["tls.crt"])[0].serial_number
    assert body["metadata"]["finalizers"].count(FINALIZER) == 1

    kube.delete_identity(namespace, "late")

    def on_crl() -> bool:
        bundle = kube.configmap_data(namespace, "meshtls-bundle") or {}
        crl = x509.load_pem_x509_crl(bundle.get("crl.pem", "").encode())
        return crl.get_revoked_certificate_by_serial_number(serial) is not None

    wait_for("the serial on the namespace's CRL", on_crl, 15)
    wait_for("the identity gone (finalizer removed)", lambda: kube.identity(namespace, "late") is None, 15)
    wait_for("the Secret gone", lambda: kube.secret_data(namespace, "late-mtls") is None, 15)
