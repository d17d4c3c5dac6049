"""meshtls-proxy data path and policy: real sockets on 127.0.0.1, real certificates, two sidecars in-process.

client app -> client sidecar (outbound 127.0.0.1:C) ==mTLS==> server sidecar (inbound :S) -> echo app
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from testsupport.proxymesh import (
    Mesh,
    ProxyThread,
    TcpApp,
    closed_port,
    digest_after_eof,
    free_ports,
    issue,
    metric,
    refused,
    roundtrip,
    spiffe,
    ssl_client_context,
)

from meshtls.pki import CertificateAuthority

WALL_CLOCK = True  # OpenSSL and the sidecars judge certificates against the real time (see conftest)

pytestmark = pytest.mark.timeout(60)


def test_bytes_round_trip_and_server_logs_client_identity(mesh: Mesh) -> None:
    for size in (1, 1000, 70_000, 3 * 1024 * 1024 + 7):
        payload = os.urandom(size)
        assert roundtrip(mesh.outbound_port, payload) == payload
    line = mesh.server_log.wait_for("inbound accepted", mesh.client.spiffe_id)
    assert f"serial={mesh.client.cert.serial_hex}" in line
    mesh.client_log.wait_for("outbound connected", mesh.server.spiffe_id, f"serial={mesh.server.cert.serial_hex}")
    text = mesh.server_proxy.metrics()
    assert metric(text, "meshtls_proxy_handshakes_total", direction="inbound", result="success") >= 4
    assert metric(text, "meshtls_proxy_received_bytes_total", direction="inbound") >= 3 * 1024 * 1024
    assert metric(text, "meshtls_proxy_sent_bytes_total", direction="inbound") >= 3 * 1024 * 1024


def test_half_close_request_then_response(mesh: Mesh, tmp_path: Path) -> None:
    """The client shuts down its write side; the app answers only after that EOF; the answer must arrive."""
    app = TcpApp(digest_after_eof)
    server2 = ProxyThread(mesh.server.config(inbound=[{"port": (p := free_ports(1)[0]), "appPort": app.port,
                                                        "allow": [mesh.client.spiffe_id]}]), "server-digest")
    client2 = ProxyThread(mesh.client.config(outbound=[{"listenPort": (o := free_ports(1)[0]),
                                                        "address": f"127.0.0.1:{p}", "peer": mesh.server.spiffe_id}]),
                          "client-digest")
    server2.start()
    client2.start()
    try:
        payload = os.urandom(500_000)
        answer = roundtrip(o, payload)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
        # and many in parallel
        results: list[bool] = []

        def one() -> None:
            data = os.urandom(10_000)
            results.append(roundtrip(o, data) == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())

        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 20
    finally:
        client2.stop()
        server2.stop()
        app.close()


def test_peer_not_on_allow_list_is_refused(mesh: Mesh) -> None:
    intruder, _, port, _ = mesh.sidecar_for("intruder")
    assert refused(port)
    line = mesh.server_log.wait_for("inbound rejected", "reason=not_allowed")
    assert f"peer={intruder.spiffe_id}" in line and f"serial={intruder.cert.serial_hex}" in line
    assert len(mesh.server_log.matching("inbound rejected", intruder.spiffe_id)) == 1  # ONE line per refusal
    assert metric(mesh.server_proxy.metrics(), "meshtls_proxy_rejections_total",
                  direction="inbound", reason="not_allowed") == 1
    # an allowed one still gets through
    assert roundtrip(mesh.outbound_port, b"still fine") == b"still fine"


def test_certificate_from_another_ca_is_refused(mesh: Mesh, other_ca: CertificateAuthority, tmp_path: Path) -> None:
    stranger = issue(other_ca, "client")  # even with an allowed SPIFFE ID
    ctx = ssl_client_context(stranger, mesh.ca.roots_pem, tmp_path / "stranger")
    with (socket.create_connection(("127.0.0.1", mesh.inbound_port), timeout=5) as raw,
          pytest.raises((ssl.SSLError, ConnectionResetError)), ctx.wrap_socket(raw) as tls):
        tls.sendall(b"hello")
        assert tls.recv(10) == b""  # TLS 1.3: the refusal arrives as an alert on the first read
    line = mesh.server_log.wait_for("inbound rejected", "reason=untrusted")
    assert "certificate verify failed" in line
    assert mesh.app.connections == 0


def test_plain_tcp_client_is_refused(mesh: Mesh) -> None:
    assert refused(mesh.inbound_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    mesh.server_log.wait_for("inbound rejected", "reason=not_tls")
    assert mesh.app.connections == 0
    # a TCP probe that sends nothing is counted but logged quietly
    socket.create_connection(("127.0.0.1", mesh.inbound_port)).close()
    mesh.server_log.wait_for("DEBUG", "reason=peer_closed")


def _s_client(openssl: str, port: int, args: list[str], payload: bytes, expect: bytes,
              timeout: float = 10.0) -> tuple[bytes, int]:
    """Run `openssl s_client`, send payload, read until `expect` shows up or the server closes."""
    proc = subprocess.Popen([openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-no_ign_eof",
                             "-verify_return_error", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(payload)
    proc.stdin.flush()
    out = b""
    deadline = time.monotonic() + timeout
    while expect not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out += proc.stdout.read()
    return out, proc.returncode


def test_openssl_s_client_without_certificate_refused_with_certificate_passes(
    mesh: Mesh, openssl: str, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(mesh.ca.roots_pem)
    out, _ = _s_client(openssl, mesh.inbound_port, ["-CAfile", str(ca_file)], b"no-cert-hello\n", b"no-cert-hello")
    assert b"no-cert-hello" not in out
    mesh.server_log.wait_for("inbound rejected", "reason=no_certificate")
    assert mesh.app.connections == 0

    cert = issue(mesh.ca, "client2")
    (tmp_path / "c.pem").write_bytes(cert.cert_chain_pem)
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    out, _ = _s_client(openssl, mesh.inbound_port, ["-CAfile", str(ca_file), "-cert", str(tmp_path / "c.pem"),
                                                    "-key", str(tmp_path / "k.pem")], b"with-cert-hello\n",
                       b"with-cert-hello")
    assert b"with-cert-hello" in out, out.decode(errors="replace")
    mesh.server_log.wait_for("inbound accepted", spiffe("client2"))
    # TLS 1.2 only, too
    out, _ = _s_client(openssl, mesh.inbound_port, ["-tls1_2", "-CAfile", str(ca_file), "-cert",
                                                    str(tmp_path / "c.pem"), "-key", str(tmp_path / "k.pem")],
                       b"tls12-hello\n", b"tls12-hello")
    assert b"tls12-hello" in out, out.decode(errors="replace")


def test_outbound_to_server_with_wrong_spiffe_id_is_refused(mesh: Mesh) -> None:
    _, _, port, log = mesh.sidecar_for("client2", peer=spiffe("someone-else"))
    assert refused(port)
    line = log.wait_for("outbound rejected", "reason=wrong_peer")
    assert f"peer={mesh.server.spiffe_id}" in line and "someone-else" in line


def test_outbound_prefix_pattern_and_unreachable_upstream(mesh: Mesh) -> None:
    _, _, port, _ = mesh.sidecar_for("client2", peer="spiffe://example.org/ns/default/*")
    assert roundtrip(port, b"pattern ok") == b"pattern ok"
    w, _, _, _ = mesh.sidecar_for("client3")
    with closed_port() as dead:
        w2 = ProxyThread(w.config(outbound=[{"listenPort": (lp := free_ports(1)[0]), "address": f"127.0.0.1:{dead}",
                                             "peer": mesh.server.spiffe_id}]), "client3b").start()
        try:
            assert refused(lp)
            assert metric(w2.metrics(), "meshtls_proxy_upstream_errors_total", direction="outbound") == 1
        finally:
            w2.stop()


def test_server_rejects_client_certificate_seen_from_client_sidecar(mesh: Mesh) -> None:
    """TLS 1.3: the client finishes its handshake before the server checks its certificate; the client sidecar
    must still close the app connection and say why."""
    _, _, port, log = mesh.sidecar_for("outsider")
    assert refused(port)
    mesh.server_log.wait_for("inbound rejected", "peer=" + spiffe("outsider"), "reason=not_allowed")
    log.wait_for("outbound upstream closed before sending anything", "allow-list")
    assert mesh.app.connections == 0


def test_metrics_and_probes(mesh: Mesh) -> None:
    import urllib.request

    assert roundtrip(mesh.outbound_port, b"x") == b"x"
    admin = mesh.server_proxy.config.admin_port
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as r:
        assert r.status == 200 and mesh.server.cert.serial_hex.encode() in r.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    assert metric(text, "meshtls_proxy_certificate_expiry_timestamp_seconds") == pytest.approx(
        mesh.server.cert.not_after.timestamp())
    assert metric(text, "meshtls_proxy_reloads_total", result="success") == 1
    assert metric(text, "meshtls_proxy_active_connections", direction="inbound") == 0
    assert metric(text, "meshtls_proxy_connections_total", direction="inbound") >= 1
    assert metric(text, "meshtls_proxy_crls") == 1
    assert metric(text, "meshtls_proxy_certificate_info", serial=mesh.server.cert.serial_hex,
                  spiffe_id=mesh.server.spiffe_id) == 1
    for request, status in ((b"HEAD /healthz HTTP/1.1\r\n\r\n", b"200"), (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
                            (b"GET /other HTTP/1.0\r\n\r\n", b"404"), (b"garbage\r\n\r\n", b"405")):
        with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
            s.sendall(request)
            answer = s.recv(4096)
        assert answer.split()[1] == status, answer
