"""Zero-downtime CA rotation, a replaced brought intermediate, and federation, with real sidecars (issue #9)."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client
from testsupport.threads import BackgroundThreads

from e2e.kube_helpers import Kube, wait_for
from e2e.mesh import Mesh, http_get
from e2e.operator_process import OperatorProcess, free_port
from meshtls.pki import CertificateAuthority, generate_ca, load_certificates, load_crls, verify_svid

GROUP, VERSION = "meshtls.dev", "v1alpha1"
SHORT = {"minTTL": "10s", "defaultTTL": "20s", "maxTTL": "30s"}


def bundle_roots(kube: Kube, namespace: str) -> list[x509.Certificate]:
    data = kube.configmap_data(namespace, "meshtls-bundle") or {}
    return load_certificates(data.get("ca.crt", "").encode()) if data.get("ca.crt") else []


def fingerprints(certs: list[x509.Certificate]) -> set[str]:
    return {c.fingerprint(hashes.SHA256()).hex() for c in certs}


def phase(kube: Kube, td: str) -> str:
    return str(kube.trust_domain(td).get("status", {}).get("rotation", {}).get("phase", ""))


class Traffic(BackgroundThreads):
    """Requests in a loop through the client sidecar, and a checker that every certificate in use verifies
    against every namespace's bundle (as the sidecars have it mounted) at every moment."""

    def __init__(self, mesh: Mesh, port: int, namespaces: list[str]) -> None:
        self.mesh, self.port, self.namespaces = mesh, port, namespaces
        self.requests = 0
        self.failures: list[str] = []
        self.unverified: list[str] = []
        super().__init__()
        self._threads = [threading.Thread(target=self._load, daemon=True),
                         threading.Thread(target=self._verify, daemon=True)]

    def _load(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = http_get(self.port, f"/r{self.requests}")
                if status != 200:
                    self.failures.append(f"{status} {body[:60]!r}")
            except Exception as exc:
                self.failures.append(repr(exc))
            self.requests += 1

    def _verify(self) -> None:
        while not self._stop.wait(0.5):
            now = dt.datetime.now(dt.UTC)
            for key, sidecar in self.mesh.sidecars.items():
                leaf_file = sidecar.host_path("/var/run/meshtls/identity") / "tls.crt"
                try:
                    chain = load_certificates(leaf_file.read_bytes())
                except (OSError, ValueError):
                    continue
                for other in self.mesh.sidecars.values():
                    bundle = other.host_path("/var/run/meshtls/bundle")
                    roots = load_certificates((bundle / "ca.crt").read_bytes())
                    crls = load_crls((bundle / "crl.pem").read_bytes())
                    result = verify_svid(chain, roots, now, crls)
                    if not result.ok:
                        self.unverified.append(f"{key} vs {other.namespace}: {result.reason}")


@pytest.fixture
def mesh(kube: Kube, kube_api: client.ApiClient, operator: OperatorProcess, tmp_path: Path) -> Iterator[Mesh]:
    if not operator.running:
        operator.start()
    m = Mesh(kube, kube_api, tmp_path)
    yield m
    m.close()


@pytest.fixture
def trust_domains(kube: Kube) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for name in created:
        try:
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, "trustdomains", name)
        except client.exceptions.ApiException:
            pass


def two_sidecars(mesh: Mesh, td: str) -> tuple[int, list[str]]:
    ns_client, ns_server = mesh.namespace("e2e-rot-a"), mesh.namespace("e2e-rot-b")
    server_tls, app, client_out = free_port(), free_port(), free_port()
    mesh.identity(ns_server, "server", {"trustDomain": td, "inbound": [{"port": server_tls, "appPort": app}],
                                        "allowedPeers": [f"spiffe://{td}/ns/{ns_client}/sa/client"]})
    mesh.identity(ns_client, "client", {"trustDomain": td, "outbound": [{
        "listenPort": client_out, "address": f"127.0.0.1:{server_tls}",
        "peer": f"spiffe://{td}/ns/{ns_server}/sa/server"}]})
    mesh.echo_app(app)
    mesh.pod(ns_server, "server")
    mesh.pod(ns_client, "client")
    assert http_get(client_out)[0] == 200
    return client_out, [ns_client, ns_server]


def rotate_and_watch(kube: Kube, mesh: Mesh, td: str, port: int, namespaces: list[str],
                     trigger: dict[str, Any]) -> tuple[Traffic, set[str], set[str]]:
    old = fingerprints(bundle_roots(kube, namespaces[0]))
    with Traffic(mesh, port, namespaces) as traffic:
        time.sleep(2)
        kube.custom.patch_cluster_custom_object(GROUP, VERSION, "trustdomains", td, trigger)
        wait_for("phase Preparing (new CA in every bundle)", lambda: phase(kube, td) == "Preparing"
                 and all(len(bundle_roots(kube, ns)) >= 2 for ns in namespaces), 20)
        wait_for("phase Rotating (signing switched)", lambda: phase(kube, td) == "Rotating", 20)
        signing = kube.trust_domain(td)["status"]["caFingerprint"]
        wait_for("every identity re-issued by the new CA", lambda: all(
            (kube.identity(ns, n) or {}).get("status", {}).get("caFingerprint") == signing
            for ns, n in ((namespaces[0], "client"), (namespaces[1], "server"))), 20)
        wait_for("phase Stable (old CA retired)", lambda: phase(kube, td) == "Stable", 60)
        wait_for("one root left in every bundle", lambda: all(len(bundle_roots(kube, ns)) == 1 for ns in namespaces),
                 10)
        time.sleep(3)  # traffic keeps flowing once the old CA is gone from the mounted bundles
    new = fingerprints(bundle_roots(kube, namespaces[0]))
    return traffic, old, new


def test_full_ca_rotation_with_no_failed_request(kube: Kube, mesh: Mesh, trust_domains: list[str]) -> None:
    td = f"rot-{uuid.uuid4().hex[:6]}.meshtls.test"
    trust_domains.append(td)
    kube.create_trust_domain(td, {"certificates": SHORT, "ca": {"propagationDelay": "5s"}})
    port, namespaces = two_sidecars(mesh, td)
    traffic, old, new = rotate_and_watch(kube, mesh, td, port, namespaces,
                                         {"metadata": {"annotations": {"meshtls.dev/rotate-ca": "e2e-1"}}})
    print(f"CA rotation: {traffic.requests} requests, {len(traffic.failures)} failed, "
          f"{len(traffic.unverified)} unverifiable certificate checks")
    assert traffic.requests > 200
    assert not traffic.failures, traffic.failures[:5]
    assert not traffic.unverified, traffic.unverified[:5]
    assert old.isdisjoint(new), "the old CA is still in the bundle"
    events = kube.core.list_namespaced_event("default", field_selector=f"involvedObject.name={td}").items
    assert {"CARotationStarted", "CARotated", "CARetired"} <= {e.reason for e in events}


def _intermediate(root: CertificateAuthority, name: str) -> CertificateAuthority:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(root.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(root.key, hashes.SHA256()))  # type: ignore[arg-type]
    return CertificateAuthority(cert, key, (root.certificate,))


def _brought_secret(kube: Kube, name: str, inter: CertificateAuthority, create: bool) -> None:
    data = {"tls.crt": base64.b64encode(inter.certificate_pem() + inter.chain[0].public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM)).decode(),
        "tls.key": base64.b64encode(inter.key_pem()).decode()}
    body = client.V1Secret(metadata=client.V1ObjectMeta(name=name), type="Opaque", data=data)
    if create:
        kube.core.create_namespaced_secret("meshtls-system", body)
    else:
        kube.core.replace_namespaced_secret(name, "meshtls-system", body)


def test_replaced_intermediate_rotates_with_no_failed_request(kube: Kube, mesh: Mesh,
                                                               trust_domains: list[str]) -> None:
    td = f"byo-{uuid.uuid4().hex[:6]}.meshtls.test"
    trust_domains.append(td)
    secret = f"team-ca-{uuid.uuid4().hex[:6]}"
    now = dt.datetime.now(dt.UTC)
    _brought_secret(kube, secret, _intermediate(generate_ca(td, now), "team intermediate 1"), create=True)
    kube.create_trust_domain(td, {"certificates": SHORT, "ca": {"secretRef": {"name": secret},
                                                                "propagationDelay": "5s"}})
    port, namespaces = two_sidecars(mesh, td)
    new_root = generate_ca(td, now)
    _brought_secret(kube, secret, _intermediate(new_root, "team intermediate 2"), create=False)
    traffic, old, new = rotate_and_watch(kube, mesh, td, port, namespaces,
                                         {"metadata": {"annotations": {"meshtls.dev/rotate-ca": "replaced-1"}}})
    print(f"intermediate replacement: {traffic.requests} requests, {len(traffic.failures)} failed")
    assert not traffic.failures, traffic.failures[:5]
    assert not traffic.unverified, traffic.unverified[:5]
    assert new == fingerprints([new_root.certificate]) and old.isdisjoint(new)
    kube.core.delete_namespaced_secret(secret, "meshtls-system")


def test_federated_peer_is_accepted_when_allowed_and_refused_when_not(kube: Kube, mesh: Mesh,
                                                                      trust_domains: list[str]) -> None:
    suffix = uuid.uuid4().hex[:6]
    td_a, td_b = f"fed-a-{suffix}.meshtls.test", f"fed-b-{suffix}.meshtls.test"
    trust_domains.extend([td_a, td_b])
    kube.create_trust_domain(td_a, {"certificates": SHORT})
    kube.create_trust_domain(td_b, {"certificates": SHORT})
    ns_a, ns_b = mesh.namespace("e2e-fed-a"), mesh.namespace("e2e-fed-b")
    server_tls, app, friend_out, stranger_out = free_port(), free_port(), free_port(), free_port()
    server_id = f"spiffe://{td_a}/ns/{ns_a}/sa/server"
    mesh.identity(ns_a, "server", {"trustDomain": td_a, "inbound": [{"port": server_tls, "appPort": app}],
                                   "allowedPeers": [f"spiffe://{td_b}/ns/{ns_b}/sa/friend"]})
    for name, port in (("friend", friend_out), ("stranger", stranger_out)):
        mesh.identity(ns_b, name, {"trustDomain": td_b, "outbound": [
            {"listenPort": port, "address": f"127.0.0.1:{server_tls}", "peer": server_id}]})
    mesh.echo_app(app)
    for ns, name in ((ns_a, "server"), (ns_b, "friend"), (ns_b, "stranger")):
        mesh.pod(ns, name)
    with pytest.raises(OSError):  # before federation: the trust domains do not know each other
        http_get(friend_out, timeout=3)
    kube.custom.patch_cluster_custom_object(GROUP, VERSION, "trustdomains", td_a, {"spec": {"federatesWith": [
        {"trustDomain": td_b, "configMapRef": {"name": "meshtls-bundle", "namespace": ns_b}}]}})
    kube.custom.patch_cluster_custom_object(GROUP, VERSION, "trustdomains", td_b, {"spec": {"federatesWith": [
        {"trustDomain": td_a, "configMapRef": {"name": "meshtls-bundle", "namespace": ns_a}}]}})
    wait_for("both bundles to carry both roots", lambda: len(bundle_roots(kube, ns_a)) == 2
             and len(bundle_roots(kube, ns_b)) == 2, 45)

    def friend_gets_through() -> bool:
        try:
            return http_get(friend_out, "/friend", timeout=3) == (200, b"echo /friend")
        except OSError:
            return False

    wait_for("the federated, allowed peer to get through", friend_gets_through, 15, interval=0.5)
    with pytest.raises(OSError):
        http_get(stranger_out, "/stranger", timeout=3)
