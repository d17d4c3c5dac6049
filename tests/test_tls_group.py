"""The negotiated key-exchange group: read from OpenSSL for real handshakes, counted per group in the metrics.

On this machine's OpenSSL 3.0 the default is x25519 (no ML-KEM); in the image (OpenSSL 3.5) it is X25519MLKEM768
(e2e/test_image.py proves that one between two sidecars and with `openssl s_client` from the image).
"""

from __future__ import annotations

import socket
import ssl
import threading
import types
from collections import defaultdict
from pathlib import Path

import pytest
from testsupport.proxymesh import build_mesh, issue, metric, parse_metrics, roundtrip

from meshtls.pki import CertificateAuthority
from meshtls.proxy.admin import Gauges, Stats, render_metrics
from meshtls.proxy.tls_group import UNKNOWN, negotiated_group, ssl_pointer

WALL_CLOCK = True

ML_KEM = ssl.OPENSSL_VERSION_INFO >= (3, 5)
DEFAULT_GROUP = "X25519MLKEM768" if ML_KEM else "x25519"


def _contexts(tmp_path: Path, ca: CertificateAuthority) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert = issue(ca, "server")
    (tmp_path / "tls.crt").write_bytes(cert.cert_chain_pem)
    (tmp_path / "tls.key").write_bytes(cert.key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """A real handshake over a socket pair; the group each side reads."""
    a, b = socket.socketpair()
    seen: dict[str, str] = {}

    def serve() -> None:
        with server.wrap_socket(a, server_side=True) as tls:
            seen["server"] = negotiated_group(tls)
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(b) as tls:
        seen["client"] = negotiated_group(tls)
        tls.sendall(b"x")
    thread.join(10)
    return seen["server"], seen["client"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize(("server_curve", "expected"), [
    (None, DEFAULT_GROUP),  # OpenSSL's default list, what the proxy uses
    ("prime256v1", "secp256r1"),  # a server that accepts P-256 only (TLS 1.3: after a HelloRetryRequest)
    ("secp384r1", "secp384r1"),
])
def test_both_sides_read_the_group_the_handshake_used(
    tmp_path: Path, ca: CertificateAuthority, version: ssl.TLSVersion, server_curve: str | None, expected: str,
) -> None:
    server, client = _contexts(tmp_path, ca)
    client.maximum_version = version
    if server_curve:
        server.set_ecdh_curve(server_curve)
    if version == ssl.TLSVersion.TLSv1_2 and expected == "X25519MLKEM768":
        expected = "x25519"  # ML-KEM hybrids are TLS 1.3 only
    assert _handshake(server, client) == (expected, expected)


def test_unknown_before_the_handshake_and_when_the_layout_is_not_confirmed(ca: CertificateAuthority) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    fresh = client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert negotiated_group(fresh) == UNKNOWN  # no handshake yet (OpenSSL 3.0 would crash reading its session)
    assert ssl_pointer(fresh) is not None  # the layout is confirmed on a real object

    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # the real inner object of one context presented with another: the check refuses it rather than trusting it
    mismatched = types.SimpleNamespace(_sslobj=fresh._sslobj, context=other, version=lambda: "TLSv1.3")
    assert ssl_pointer(mismatched) is None  # type: ignore[arg-type]
    assert negotiated_group(mismatched) == UNKNOWN  # type: ignore[arg-type]
    # not a CPython _ssl object at all
    foreign = types.SimpleNamespace(_sslobj=object(), context=client, version=lambda: "TLSv1.3")
    assert negotiated_group(foreign) == UNKNOWN  # type: ignore[arg-type]


def test_metrics_count_handshakes_per_group() -> None:
    stats = Stats()
    stats.groups = defaultdict(int, {("inbound", "X25519MLKEM768"): 3, ("outbound", "x25519"): 1})
    text = render_metrics(stats, Gauges(True, None, None, None, None, 1, 0, None, 1)).decode()
    parse_metrics(text)
    assert metric(text, "meshtls_proxy_tls_groups_total", direction="inbound", group="X25519MLKEM768") == 3
    assert metric(text, "meshtls_proxy_tls_groups_total", direction="outbound", group="x25519") == 1
    assert "# TYPE meshtls_proxy_tls_groups counter" in text


def test_two_sidecars_count_the_group_they_negotiated(tmp_path: Path, ca: CertificateAuthority) -> None:
    with build_mesh(tmp_path, ca) as mesh:
        for _ in range(3):
            assert roundtrip(mesh.outbound_port, b"ping") == b"ping"
        server = mesh.server_proxy.metrics()
        client = mesh.client_proxy.metrics()
    assert metric(server, "meshtls_proxy_tls_groups_total", direction="inbound", group=DEFAULT_GROUP) == 3
    assert metric(client, "meshtls_proxy_tls_groups_total", direction="outbound", group=DEFAULT_GROUP) == 3
    assert "unknown" not in server + client
