"""Prometheus metrics of the operator, named in cert-manager's style."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
_ID = ["namespace", "name", "spiffe_id"]

expiration = Gauge("meshtls_certificate_expiration_timestamp_seconds",
                   "When the identity's current certificate expires (unix time)", _ID, registry=REGISTRY)
renewal = Gauge("meshtls_certificate_renewal_timestamp_seconds",
                "When the identity's certificate will be renewed (unix time)", _ID, registry=REGISTRY)
ready = Gauge("meshtls_certificate_ready_status", "1 when the identity is Ready, else 0", _ID, registry=REGISTRY)
issued = Counter("meshtls_certificates_issued_total", "Certificates issued (first issuance)", registry=REGISTRY)
rotated = Counter("meshtls_certificates_rotated_total", "Certificates re-issued (rotations and repairs)",
                  ["reason"], registry=REGISTRY)
revoked = Counter("meshtls_certificates_revoked_total", "Serials put on a CRL", ["trust_domain"], registry=REGISTRY)
failures = Counter("meshtls_issuance_failures_total", "Reconciliations that ended in an error", ["reason"],
                   registry=REGISTRY)
issuance_seconds = Histogram("meshtls_issuance_duration_seconds", "Time to mint and store one certificate",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=REGISTRY)
crl_entries = Gauge("meshtls_crl_entries", "Entries on the trust domain's CRL", ["trust_domain"], registry=REGISTRY)
crl_writes = Counter("meshtls_crl_publications_total", "CRL signings published to bundles", ["trust_domain"],
                     registry=REGISTRY)
ca_expiration = Gauge("meshtls_ca_expiration_timestamp_seconds", "When the trust domain's signing CA expires",
                      ["trust_domain"], registry=REGISTRY)

api_requests = Counter("meshtls_api_requests_total", "Requests the operator sent to the Kubernetes API (its own "
                       "client; kopf's watches not included)", ["verb", "resource"], registry=REGISTRY)


def count_api_request(verb: str, resource: str) -> None:
    api_requests.labels(verb, resource).inc()


def forget_identity(namespace: str, name: str, spiffe_id: str) -> None:
    for gauge in (expiration, renewal, ready):
        try:
            gauge.remove(namespace, name, spiffe_id)
        except KeyError:
            pass


def serve(port: int, address: str = "0.0.0.0") -> None:
    start_http_server(port, addr=address, registry=REGISTRY)
