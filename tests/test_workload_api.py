"""The SPIFFE Workload API served by meshtls-proxy, over a real Unix socket to real gRPC clients.

The proxy runs in-process on its own loop (testsupport.proxymesh.ProxyThread) with its volumes written the kubelet's
way; the clients are py-spiffe's `WorkloadApiClient` (the SPIFFE project's own) and raw gRPC calls whose replies are
parsed by py-spiffe's generated protobuf classes, so the wire format is judged by protobuf itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2
from spiffe.spiffe_id.spiffe_id import TrustDomain
from testsupport.kubelet import http_get, identity_files, write_atomic_volume
from testsupport.proxymesh import ProxyThread, Workload, free_ports, issue, metric, spiffe

from meshtls.dataplane.layout import BUNDLE_DIR, CONFIG_DIR, IDENTITY_DIR, WORKLOAD_API_DIR
from meshtls.injection.inject import workload_api_container
from meshtls.injection.target import InjectionOptions, InjectionTarget
from meshtls.pki import CertificateAuthority, build_crl, crl_pem, generate_ca, issue_svid, workload_spiffe_id
from meshtls.pki.crl import RevokedCertificate
from meshtls.pki.keys import load_private_key_pem
from meshtls.proxy.main import attach_workload_api
from meshtls.proxy.volumes import Bundle, Identity
from meshtls.proxy.workload_api import (
    NO_JWT,
    Material,
    Refusal,
    WorkloadApiServer,
    decide,
    decide_bundles,
    socket_mode,
)

WALL_CLOCK = True  # the proxy judges validity against the real time
pytestmark = pytest.mark.timeout(60)
HEADER = (("workload.spiffe.io", "true"),)
TD = "example.org"


@dataclass
class Api:
    workload: Workload
    proxy: ProxyThread
    server: WorkloadApiServer
    socket: str

    @property
    def address(self) -> str:
        return "unix:" + self.socket

    def stream(self, method: str = "FetchX509SVID", metadata: Any = HEADER) -> Iterator[Any]:
        reply = workload_pb2.X509SVIDResponse if method == "FetchX509SVID" else workload_pb2.X509BundlesResponse
        channel = grpc.insecure_channel(self.address)
        call = channel.unary_stream(f"/SpiffeWorkloadAPI/{method}", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=reply.FromString)
        request = workload_pb2.X509SVIDRequest() if method == "FetchX509SVID" else workload_pb2.X509BundlesRequest()
        return call(request, metadata=metadata, timeout=20)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self.proxy.metrics()


def start_api(tmp_path: Path, ca: CertificateAuthority, mode: int = 0o666, spiffe_id: str | None = None,
              workload: Workload | None = None) -> Api:
    workload = workload or Workload("web", tmp_path, ca)
    config = workload.config()
    if spiffe_id:
        config["spiffeId"] = spiffe_id
    proxy = ProxyThread(config, "web")
    socket_path = str(tmp_path / "wl" / "agent.sock")
    server = attach_workload_api(proxy.proxy, socket_path, mode)
    proxy.start()
    asyncio.run_coroutine_threadsafe(server.start(), proxy.loop).result(10)
    return Api(workload, proxy, server, socket_path)


@pytest.fixture
def api(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Api]:
    a = start_api(tmp_path, ca)
    yield a
    asyncio.run_coroutine_threadsafe(a.server.close(), a.proxy.loop).result(10)
    a.proxy.stop()


def der_chain(pem: bytes) -> bytes:
    return b"".join(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)
                    if c.issuer != c.subject)


def pkcs8(key_pem: bytes) -> bytes:
    return load_private_key_pem(key_pem).private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


def certs_of(der: bytes) -> list[x509.Certificate]:
    """Certificates concatenated in DER (the Workload API's chains and bundles), split by their ASN.1 lengths."""
    out, i = [], 0
    while i < len(der):
        first = der[i + 1]
        size, header = (first, 2) if first < 0x80 else (int.from_bytes(der[i + 2:i + 2 + (first & 0x7F)]),
                                                          2 + (first & 0x7F))
        out.append(x509.load_der_x509_certificate(der[i:i + header + size]))
        i += header + size
    return out


def next_message(stream: Iterator[Any], timeout: float = 10.0) -> Any:
    """The stream's next message, or AssertionError if none comes (grpc has no per-message timeout)."""
    box: list[Any] = []

    def read() -> None:
        try:
            box.append(next(stream, None))
        except grpc.RpcError as exc:
            box.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no message within {timeout}s"
    if isinstance(box[0], grpc.RpcError):
        raise box[0]
    return box[0]


def served(api: Api, timeout: float = 10.0) -> Any:
    """The first message of a new FetchX509SVID call, once the proxy has reloaded what was just written."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return next_message(api.stream())
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def code_of(stream: Iterator[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    return err.value.code(), err.value.details()  # type: ignore[attr-defined]


# --- served, and judged by py-spiffe ------------------------------------------------------------------------------


def test_py_spiffe_fetches_the_pods_svid_key_and_bundle(api: Api) -> None:
    client = WorkloadApiClient(f"unix://{api.socket}")
    try:
        context = client.fetch_x509_context(timeout=10)
        svid = context.default_svid
        assert str(svid.spiffe_id) == spiffe("web")
        cert = api.workload.cert
        assert [c.public_bytes(Encoding.DER) for c in svid.cert_chain] == \
            [c.public_bytes(Encoding.DER) for c in certs_of(der_chain(cert.cert_chain_pem))]
        assert svid.private_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()) == pkcs8(cert.key_pem)
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TD))
        assert bundle is not None
        assert {c.public_bytes(Encoding.DER) for c in bundle.x509_authorities} == \
            {api.workload.ca.certificate.public_bytes(Encoding.DER)}
        bundles = client.fetch_x509_bundles(timeout=10)
        assert bundles.get_bundle_for_trust_domain(TrustDomain(TD)) is not None
    finally:
        client.close()
    assert os.stat(api.socket).st_mode & 0o777 == 0o666 and stat.S_ISSOCK(os.stat(api.socket).st_mode)


def test_the_socket_takes_the_mode_asked_for(tmp_path: Path, ca: CertificateAuthority) -> None:
    a = start_api(tmp_path, ca, mode=0o660)
    try:
        assert os.stat(a.socket).st_mode & 0o777 == 0o660
    finally:
        a.proxy.stop()
    for bad in ("0400", "777x", "1777", "0077"):
        with pytest.raises(ValueError):
            socket_mode(bad)


# --- what the spec says to refuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, (("workload.spiffe.io", "True"),), (("workload.spiffe.io", "1"),),
                                      (("x-workload", "true"),)])
def test_a_call_without_the_security_header_is_invalid_argument(api: Api, metadata: Any) -> None:
    for method in ("FetchX509SVID", "FetchX509Bundles"):
        code, details = code_of(api.stream(method, metadata))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "workload.spiffe.io" in details
    assert metric(api.metrics(), "meshtls_proxy_workload_api_refusals_total", rpc="FetchX509SVID",
                  code="INVALID_ARGUMENT") >= 1


def test_jwt_calls_are_unimplemented_and_say_why(api: Api) -> None:
    channel = grpc.insecure_channel(api.address)
    fetch = channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID",
                                request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=workload_pb2.JWTSVIDResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        fetch(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=HEADER, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and err.value.details() == NO_JWT  # type: ignore[attr-defined]
    bundles = channel.unary_stream("/SpiffeWorkloadAPI/FetchJWTBundles",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=workload_pb2.JWTBundlesResponse.FromString)
    code, details = code_of(bundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "JWT" in details
    with pytest.raises(grpc.RpcError) as err:  # the header is checked first, as for every call
        fetch(workload_pb2.JWTSVIDRequest(audience=["x"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    channel.close()


# --- a new message on every change ---------------------------------------------------------------------------------


def test_every_rotation_ca_step_federation_and_crl_change_pushes_a_full_message(api: Api) -> None:
    svids, bundles = api.stream(), api.stream("FetchX509Bundles")
    first = next_message(svids)
    assert first.svids[0].x509_svid == der_chain(api.workload.cert.cert_chain_pem)
    assert next_message(bundles).bundles[f"spiffe://{TD}"] == api.workload.ca.certificate.public_bytes(Encoding.DER)
    seen = {first.svids[0].x509_svid}
    for _ in range(3):  # rotations: a new chain and key each time, the bundle unchanged
        cert = api.workload.rotate()
        msg = next_message(svids)
        assert msg.svids[0].x509_svid == der_chain(cert.cert_chain_pem) not in seen
        assert msg.svids[0].x509_svid_key == pkcs8(cert.key_pem)
        seen.add(msg.svids[0].x509_svid)
    # a CA rotation step: the next CA joins the bundle (both streams see it)
    now = dt.datetime.now(dt.UTC)
    next_ca = generate_ca(TD, now)
    crl = crl_pem(build_crl(api.workload.ca, [], 2, now))
    api.workload.set_bundle(api.workload.ca.roots_pem + next_ca.roots_pem, crl)
    msg = next_message(svids)
    assert len(certs_of(msg.svids[0].bundle)) == 2 and not msg.federated_bundles
    assert len(certs_of(next_message(bundles).bundles[f"spiffe://{TD}"])) == 2
    # federation: another trust domain's root arrives as a federated bundle, keyed by its SPIFFE ID
    partner = generate_ca("partner.test", now)
    api.workload.set_bundle(api.workload.ca.roots_pem + next_ca.roots_pem + partner.roots_pem, crl)
    msg = next_message(svids)
    assert dict(msg.federated_bundles) == {"spiffe://partner.test": partner.certificate.public_bytes(Encoding.DER)}
    assert set(next_message(bundles).bundles) == {f"spiffe://{TD}", "spiffe://partner.test"}
    # a CRL update: the CRL travels in `crl`, DER
    other = issue(api.workload.ca, "gone")
    crl3 = build_crl(api.workload.ca, [RevokedCertificate(other.serial_number, now, other.not_after)], 3, now)
    api.workload.set_bundle(api.workload.ca.roots_pem + next_ca.roots_pem + partner.roots_pem, crl_pem(crl3))
    msg = next_message(svids)
    assert list(msg.crl) == [crl3.public_bytes(Encoding.DER)]
    assert list(next_message(bundles).crl) == [crl3.public_bytes(Encoding.DER)]
    text = api.metrics()
    for reason, count in (("initial", 1), ("rotation", 3), ("ca_bundle", 1), ("federation", 1), ("crl", 1)):
        assert metric(text, "meshtls_proxy_workload_api_messages_total", rpc="FetchX509SVID", reason=reason) == count
        assert metric(text, "meshtls_proxy_workload_api_last_push_timestamp_seconds", reason=reason) > 0
    assert metric(text, "meshtls_proxy_workload_api_clients", rpc="FetchX509SVID") == 1
    assert metric(text, "meshtls_proxy_workload_api_clients", rpc="FetchX509Bundles") == 1
    svids.cancel()  # type: ignore[attr-defined]
    bundles.cancel()  # type: ignore[attr-defined]


# --- never the wrong material ---------------------------------------------------------------------------------------


def test_a_key_that_does_not_match_is_never_served(tmp_path: Path, ca: CertificateAuthority) -> None:
    workload = Workload("web", tmp_path, ca)
    a, b = issue(ca, "web"), issue(ca, "web")
    write_atomic_volume(workload.identity_dir, identity_files(a.cert_chain_pem, b.key_pem, a.ca_pem))
    api = start_api(tmp_path, ca, workload=workload)
    try:
        code, details = code_of(api.stream())  # nothing good was ever loaded
        assert code == grpc.StatusCode.UNAVAILABLE and "no certificate loaded" in details
        good = workload.rotate()
        msg = served(api)
        assert msg.svids[0].x509_svid_key == pkcs8(good.key_pem)
        stream = api.stream()
        next_message(stream)
        write_atomic_volume(workload.identity_dir, identity_files(a.cert_chain_pem, b.key_pem, a.ca_pem))
        # the mismatched pair is refused by the reloader: the good one stays, nothing new is pushed
        with pytest.raises(AssertionError):
            next_message(stream, timeout=1.5)
        assert next_message(api.stream()).svids[0].x509_svid == der_chain(good.cert_chain_pem)
        stream.cancel()  # type: ignore[attr-defined]
    finally:
        api.proxy.stop()


def test_an_expired_certificate_is_unavailable_not_served(tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    ca = generate_ca(TD, past - dt.timedelta(hours=1))
    workload = Workload("web", tmp_path, ca)
    old = issue_svid(ca, workload_spiffe_id(TD, "default", "web"), past, dt.timedelta(minutes=30))
    write_atomic_volume(workload.identity_dir, identity_files(old.cert_chain_pem, old.key_pem, old.ca_pem))
    api = start_api(tmp_path, ca, workload=workload)
    try:
        code, details = code_of(api.stream())
        assert code == grpc.StatusCode.UNAVAILABLE and "expired" in details
        assert metric(api.metrics(), "meshtls_proxy_workload_api_serving") == 0
    finally:
        api.proxy.stop()


def test_a_removed_secret_ends_the_stream_with_permission_denied(api: Api) -> None:
    stream = api.stream()
    next_message(stream)
    shutil.rmtree(api.workload.identity_dir)  # the Secret's volume is gone: no stale material
    code, details = code_of(stream)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no longer mounted" in details
    code, _ = code_of(api.stream())
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_own_certificate_ends_the_stream_with_permission_denied(api: Api) -> None:
    stream = api.stream()
    next_message(stream)
    api.workload.revoke(api.workload.cert)  # what deleting the WorkloadIdentity publishes
    code, details = code_of(stream)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in details
    # the bundles are still served: with the CRL that revokes it
    bundles = next_message(api.stream("FetchX509Bundles"))
    crl = x509.load_der_x509_crl(bundles.crl[0])
    assert crl.get_revoked_certificate_by_serial_number(api.workload.cert.serial_number) is not None
    # a renewed certificate is served again
    cert = api.workload.rotate()
    assert served(api).svids[0].x509_svid == der_chain(cert.cert_chain_pem)


def test_another_identity_in_the_secret_is_permission_denied(tmp_path: Path, ca: CertificateAuthority) -> None:
    api = start_api(tmp_path, ca, spiffe_id=spiffe("someone-else"))
    try:
        code, details = code_of(api.stream())
        assert code == grpc.StatusCode.PERMISSION_DENIED and spiffe("someone-else") in details
    finally:
        api.proxy.stop()


def test_a_certificate_from_a_ca_outside_the_bundle_is_unavailable(tmp_path: Path, ca: CertificateAuthority,
                                                                     other_ca: CertificateAuthority) -> None:
    workload = Workload("web", tmp_path, ca)
    workload.rotate(issue(other_ca, "web"))  # signed by a CA the bundle does not carry
    api = start_api(tmp_path, ca, workload=workload)
    try:
        code, details = code_of(api.stream())
        assert code == grpc.StatusCode.UNAVAILABLE and "does not verify" in details
    finally:
        api.proxy.stop()


# --- the Workload API alone, as injected beside a data plane that is not meshtls-proxy -------------------------------


def test_the_standalone_container_serves_the_same_api(tmp_path: Path, ca: CertificateAuthority) -> None:
    workload = Workload("web", tmp_path, ca)
    target = InjectionTarget("web", "web", spiffe("web"), "web-mtls", "web-meshtls-proxy", "meshtls-bundle",
                             workload_api=True)
    container = workload_api_container(target, InjectionOptions())
    socket_dir = tmp_path / "s"
    host = {IDENTITY_DIR: str(workload.identity_dir), BUNDLE_DIR: str(workload.bundle_dir),
            WORKLOAD_API_DIR: str(socket_dir)}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == set(host) and CONFIG_DIR not in mounts  # no proxy config: it has no listeners

    def on_host(arg: str) -> str:
        for path, there in host.items():
            arg = arg.replace(path, there)
        return arg

    admin = free_ports(1)[0]
    command = [on_host(a) for a in container["command"]]
    command[command.index("--admin-port") + 1] = str(admin)
    assert command[0] == "meshtls-workload-api"
    executable = str(Path(sys.executable).parent / command[0])
    process = subprocess.Popen([executable, *command[1:], "--identity-dir", str(workload.identity_dir),
                                "--bundle-dir", str(workload.bundle_dir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        socket_path = str(socket_dir / "agent.sock")
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.05)
        with WorkloadApiClient(f"unix://{socket_path}") as client:
            svid = client.fetch_x509_svid(timeout=10)
        assert str(svid.spiffe_id) == spiffe("web")
        assert svid.leaf.serial_number == workload.cert.serial_number
        status, body = http_get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200 and b"meshtls_proxy_workload_api_serving 1" in body
    finally:
        process.terminate()
        process.wait(10)


def test_the_standalone_command_refuses_a_bad_spiffe_id(tmp_path: Path) -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "meshtls-workload-api"), "--spiffe-id", "web",
                             "--workload-api-socket", str(tmp_path / "a.sock")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--spiffe-id" in result.stderr


# --- the decision, pure ---------------------------------------------------------------------------------------------


def _views(ca: CertificateAuthority, now: dt.datetime, roots: tuple[x509.Certificate, ...] = ()) -> tuple[Any, Any]:
    cert = issue_svid(ca, workload_spiffe_id(TD, "default", "web"), now, dt.timedelta(hours=1))
    chain = tuple(x509.load_pem_x509_certificates(cert.cert_chain_pem))
    key = load_private_key_pem(cert.key_pem)
    identity = Identity("v1", cert.cert_chain_pem, cert.key_pem, chain, key, spiffe("web"))
    all_roots = (ca.certificate, *roots)
    bundle = Bundle("v1", b"".join(r.public_bytes(Encoding.PEM) for r in all_roots), all_roots, b"", ())
    return identity, bundle


def test_roots_are_grouped_by_the_trust_domain_they_name_and_a_nameless_root_is_the_pods_own(
        ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)  # the module's CAs are born at the wall clock
    partner = generate_ca("partner.test", now)
    nameless = _intermediate_free_root(now)
    identity, bundle = _views(ca, now, (partner.certificate, nameless))
    material = decide(identity, bundle, spiffe("web"), True, now)
    assert isinstance(material, Material)
    assert set(material.trust.bundles) == {f"spiffe://{TD}", "spiffe://partner.test"}
    assert certs_of(material.trust.own) == [ca.certificate, nameless]
    assert material.trust.federated == {"spiffe://partner.test": partner.certificate.public_bytes(Encoding.DER)}


def test_validity_is_judged_by_the_injected_clock(ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    identity, bundle = _views(ca, now)
    assert isinstance(decide(identity, bundle, spiffe("web"), True, now), Material)
    early = decide(identity, bundle, spiffe("web"), True, now - dt.timedelta(hours=1))
    late = decide(identity, bundle, spiffe("web"), True, now + dt.timedelta(hours=2))
    assert isinstance(early, Refusal) and early.code == "UNAVAILABLE" and "not valid before" in early.message
    assert isinstance(late, Refusal) and late.code == "UNAVAILABLE" and "expired" in late.message
    gone = decide(identity, bundle, spiffe("web"), False, now)
    assert isinstance(gone, Refusal) and gone.code == "PERMISSION_DENIED"
    refused = decide_bundles(bundle, TD, False)
    assert isinstance(refused, Refusal) and refused.code == "PERMISSION_DENIED"


def _intermediate_free_root(now: dt.datetime) -> x509.Certificate:
    """A self-signed CA with no SAN at all, like many a brought root."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "team root")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
