"""Hot reload: revocation, rotation under a live connection, broken updates, and a load loop across rotations.

Every volume change is written the kubelet's way (atomic `..data` swap), the proxies are never restarted.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from testsupport.kubelet import bundle_files, identity_files, write_atomic_volume
from testsupport.proxymesh import (
    RELOAD,
    LogCapture,
    Mesh,
    ProxyThread,
    TcpApp,
    Workload,
    echo,
    free_ports,
    issue,
    metric,
    refused,
    roundtrip,
    spiffe,
    ssl_client_context,
)

from meshtls.pki import CertificateAuthority, build_crl, crl_pem, generate_ca

WALL_CLOCK = True  # OpenSSL and the sidecars judge certificates against the real time (see conftest)

pytestmark = pytest.mark.timeout(60)


def _wait(predicate: object, timeout: float = 5.0, step: float = 0.005) -> float:
    """Seconds until predicate() is true."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def _generation(p: ProxyThread) -> int:
    return int(p.call(lambda: p.proxy.contexts.generation if p.proxy.contexts else 0))


def _server_serial(port: int, cert: object, ca_pem: bytes, tmp: Path) -> str:
    """The serial a fresh direct TLS connection to a server sidecar sees."""
    from cryptography import x509

    ctx = ssl_client_context(cert, ca_pem, tmp)  # type: ignore[arg-type]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


class Stream:
    """A long-lived full-duplex connection: a writer thread streams random frames while a reader verifies the echo.

    Like an HTTP/2 or gRPC bidirectional stream, both directions are in flight at once, for as long as it runs.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = bytearray()
        self.received = bytearray()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        rnd = random.Random(7)
        try:
            while not self._stop.is_set():
                frame = rnd.randbytes(rnd.randint(1, 20_000))
                self.sent += frame
                self.sock.sendall(frame)
                time.sleep(0.002)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.received += data
        except BaseException as exc:
            self.error = exc

    def progress(self) -> int:
        return len(self.received)

    def finish(self) -> None:
        self._stop.set()
        self._writer.join(10)
        self._reader.join(10)
        self.sock.close()
        assert self.error is None, self.error
        assert len(self.received) == len(self.sent) and self.received == self.sent


def test_revoked_client_refused_within_two_reload_intervals_other_client_unaffected(mesh: Mesh) -> None:
    other, _, other_port, _ = mesh.sidecar_for("client2")
    for _ in range(3):  # the client sidecar now holds a resumable session with the server sidecar
        assert roundtrip(mesh.outbound_port, b"before") == b"before"
    mesh.client_log.wait_for("outbound connected", "resumed=yes")
    generation = _generation(mesh.server_proxy)

    mesh.server.revoke(mesh.client.cert)  # a new CRL in the server's trust bundle, the kubelet way
    latency = _wait(lambda: _generation(mesh.server_proxy) > generation)
    print(f"\nCRL picked up {latency * 1000:.0f} ms after the bundle update (reload interval {RELOAD * 1000:.0f} ms)")
    assert latency <= 2 * RELOAD
    mesh.server_log.wait_for("reloaded", "crl_numbers=2")

    # the very next connection is refused, even though the client sidecar tries to resume its old session
    assert refused(mesh.outbound_port)
    line = mesh.server_log.wait_for("inbound rejected", "reason=revoked")
    assert "certificate revoked" in line
    assert roundtrip(other_port, b"other client still fine") == b"other client still fine"
    assert refused(mesh.outbound_port)
    metrics = mesh.server_proxy.metrics()
    assert metric(metrics, "meshtls_proxy_rejections_total", direction="inbound", reason="revoked") == 2
    assert other.spiffe_id in mesh.server_log.matching("inbound accepted")[-1]

    # a renewed client certificate (new serial) is accepted again
    mesh.client.rotate()
    _wait(lambda: mesh.client_proxy.call(lambda: mesh.client_proxy.proxy.contexts.identity.serial)
          == mesh.client.cert.serial_hex)
    assert roundtrip(mesh.outbound_port, b"renewed") == b"renewed"


def test_rotation_under_a_live_connection_and_new_connections_see_the_new_serial(mesh: Mesh, tmp_path: Path) -> None:
    stream = Stream(mesh.outbound_port)
    _wait(lambda: stream.progress() > 100_000)
    old_server, old_client = mesh.server.cert, mesh.client.cert
    assert _server_serial(mesh.inbound_port, issue(mesh.ca, "client2"), mesh.ca.roots_pem, tmp_path / "a") == \
        old_server.serial_hex

    for _ in range(3):
        new_server = mesh.server.rotate()
        new_client = mesh.client.rotate()
        mesh.server_log.wait_for("reloaded", f"serial={new_server.serial_hex}")
        mesh.client_log.wait_for("reloaded", f"serial={new_client.serial_hex}")
        before = stream.progress()
        _wait(lambda before=before: stream.progress() > before + 100_000)  # the old connection keeps flowing
        # new connections: the client sees the new server serial, the server the new client serial
        assert roundtrip(mesh.outbound_port, b"fresh") == b"fresh"
        mesh.client_log.wait_for("outbound connected", f"serial={new_server.serial_hex}")
        mesh.server_log.wait_for("inbound accepted", f"serial={new_client.serial_hex}")
        assert _server_serial(mesh.inbound_port, issue(mesh.ca, "client2"), mesh.ca.roots_pem, tmp_path / "b") == \
            new_server.serial_hex
    stream.finish()
    assert len(stream.sent) > 500_000
    assert new_server.serial_hex != old_server.serial_hex and new_client.serial_hex != old_client.serial_hex
    text = mesh.server_proxy.metrics()
    assert metric(text, "meshtls_proxy_reloads_total", result="success") == 4
    assert metric(text, "meshtls_proxy_certificate_expiry_timestamp_seconds") == pytest.approx(
        new_server.not_after.timestamp())


def test_broken_updates_keep_the_old_pair(mesh: Mesh) -> None:
    good = mesh.server.cert
    a, b = issue(mesh.ca, "server"), issue(mesh.ca, "server")
    # a key that does not match the certificate
    write_atomic_volume(mesh.server.identity_dir, identity_files(a.cert_chain_pem, b.key_pem, a.ca_pem))
    line = mesh.server_log.wait_for("reload identity failed", "does not match")
    assert a.serial_hex in line
    time.sleep(3 * RELOAD)
    assert len(mesh.server_log.matching("reload identity failed")) == 1  # retried every tick, logged once
    assert roundtrip(mesh.outbound_port, b"still served") == b"still served"
    mesh.client_log.wait_for("outbound connected", f"serial={good.serial_hex}")
    # garbage
    write_atomic_volume(mesh.server.identity_dir, identity_files(b"not a pem", b"nope", a.ca_pem))
    mesh.server_log.wait_for("reload identity failed", "contains no PEM certificate")
    # a bundle without a CA certificate does not replace the good one, nor does a bad CRL
    write_atomic_volume(mesh.server.bundle_dir, {"crl.pem": b"x"})
    mesh.server_log.wait_for("reload bundle failed", "ca.crt", "is missing")
    impostor = CertificateAuthority(mesh.ca.certificate, generate_ca("example.org", dt.datetime.now(dt.UTC)).key)
    forged = crl_pem(build_crl(impostor, [], 9, dt.datetime.now(dt.UTC)))  # our CA's name, someone else's key
    write_atomic_volume(mesh.server.bundle_dir, bundle_files(mesh.ca.roots_pem, forged))
    mesh.server_log.wait_for("reload bundle failed", "signature does not verify")
    assert roundtrip(mesh.outbound_port, b"still served") == b"still served"
    status, _ = _readyz(mesh.server_proxy)
    assert status
    # then a good pair loads
    c = mesh.server.rotate()
    mesh.server_log.wait_for("reloaded", f"serial={c.serial_hex}")
    assert roundtrip(mesh.outbound_port, b"new pair") == b"new pair"
    mesh.client_log.wait_for("outbound connected", f"serial={c.serial_hex}")
    text = mesh.server_proxy.metrics()
    assert metric(text, "meshtls_proxy_reloads_total", result="failure") >= 3


def _readyz(p: ProxyThread) -> tuple[bool, str]:
    return p.call(p.proxy.ready)  # type: ignore[no-any-return]


def test_plain_files_without_data_link_mid_update(tmp_path: Path, ca: CertificateAuthority) -> None:
    """Someone copies files in place (no `..data`): a half-written pair is never served."""
    app = TcpApp(echo)
    ident, bundle = tmp_path / "id", tmp_path / "bundle"
    ident.mkdir()
    bundle.mkdir()
    first = issue(ca, "server")
    (ident / "tls.crt").write_bytes(first.cert_chain_pem)
    (ident / "tls.key").write_bytes(first.key_pem)
    (bundle / "ca.crt").write_bytes(ca.roots_pem)  # no crl.pem: runs without revocation, with a warning
    port = free_ports(1)[0]
    w = Workload("client2", tmp_path, ca)
    cfg = w.config(inbound=[{"port": port, "appPort": app.port, "allow": [spiffe("client2")]}])
    cfg |= {"spiffeId": spiffe("server"), "identityDir": str(ident), "bundleDir": str(bundle)}
    log = LogCapture("meshtls.proxy.plain")
    p = ProxyThread(cfg, "plain").start()
    try:
        log.wait_for("no CRL in", "revocation is not checked")
        second = issue(ca, "server")
        (ident / "tls.crt").write_bytes(second.cert_chain_pem)  # the key follows later
        log.wait_for("reload identity failed", "does not match")
        assert _server_serial(port, w.cert, ca.roots_pem, tmp_path / "probe") == first.serial_hex
        (ident / "tls.key").write_bytes(second.key_pem)
        log.wait_for("reloaded", f"serial={second.serial_hex}")
        assert _server_serial(port, w.cert, ca.roots_pem, tmp_path / "probe") == second.serial_hex
        assert p.call(p.proxy.ready)[0]
    finally:
        p.stop()
        log.close()
        app.close()


def test_readyz_without_identity_then_identity_arrives(tmp_path: Path, ca: CertificateAuthority) -> None:
    w = Workload("server", tmp_path, ca)
    shutil.rmtree(w.identity_dir)
    w.identity_dir.mkdir()
    port = free_ports(1)[0]
    app = TcpApp(echo)
    log = LogCapture("meshtls.proxy.late")
    p = ProxyThread(w.config(inbound=[{"port": port, "appPort": app.port, "allow": [spiffe("client2")]}]),
                    "late").start()
    try:
        ok, reason = p.call(p.proxy.ready)
        assert not ok and "tls.crt" in reason and "missing" in reason
        log.wait_for("no usable identity yet")
        assert refused(port)
        log.wait_for("inbound rejected", "reason=no_identity")
        w.rotate()
        log.wait_for("loaded", f"serial={w.cert.serial_hex}")
        assert p.call(p.proxy.ready)[0]
        client = issue(ca, "client2")
        assert _server_serial(port, client, ca.roots_pem, tmp_path / "probe") == w.cert.serial_hex
    finally:
        p.stop()
        log.close()
        app.close()


def test_expired_certificate_is_not_ready(tmp_path: Path, ca: CertificateAuthority) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    old_ca = generate_ca("example.org", past - dt.timedelta(hours=1))
    w = Workload("server", tmp_path, old_ca)
    w.rotate(issue(old_ca, "server", ttl=dt.timedelta(minutes=30), now=past))
    p = ProxyThread(w.config(), "expired").start()
    try:
        ok, reason = p.call(p.proxy.ready)
        assert not ok and "expired" in reason
        assert metric(p.metrics(), "meshtls_proxy_ready") == 0
    finally:
        p.stop()


def test_ca_rotation_with_an_overlapping_bundle(mesh: Mesh) -> None:
    """New CA: bundle holds both roots (and a CRL each); workloads move one by one; no connection fails."""
    new_ca = generate_ca("example.org", dt.datetime.now(dt.UTC))
    now = dt.datetime.now(dt.UTC)
    both_roots = mesh.ca.roots_pem + new_ca.roots_pem
    both_crls = crl_pem(build_crl(mesh.ca, [], 5, now)) + crl_pem(build_crl(new_ca, [], 1, now))
    for w in (mesh.server, mesh.client):
        w.set_bundle(both_roots, both_crls)
    mesh.server_log.wait_for("reloaded", "roots=2", "crls=2")
    mesh.client_log.wait_for("reloaded", "roots=2", "crls=2")
    assert roundtrip(mesh.outbound_port, b"old-old") == b"old-old"
    mesh.server.rotate(issue(new_ca, "server"))
    mesh.server_log.wait_for("reloaded", f"serial={mesh.server.cert.serial_hex}")
    assert roundtrip(mesh.outbound_port, b"old client, new server") == b"old client, new server"
    mesh.client.rotate(issue(new_ca, "client"))
    mesh.client_log.wait_for("reloaded", f"serial={mesh.client.cert.serial_hex}")
    assert roundtrip(mesh.outbound_port, b"new-new") == b"new-new"
    # the old root leaves the bundle
    for w in (mesh.server, mesh.client):
        w.set_bundle(new_ca.roots_pem, crl_pem(build_crl(new_ca, [], 2, now)))
    mesh.server_log.wait_for("reloaded", "roots=1", "crl_numbers=2")
    mesh.client_log.wait_for("reloaded", "roots=1", "crl_numbers=2")
    assert roundtrip(mesh.outbound_port, b"new only") == b"new only"


@pytest.mark.timeout(180)  # ~10 s alone; generous for a loaded CI machine
def test_load_loop_across_rotations_has_no_failures(mesh: Mesh) -> None:
    """2,000 requests, each on a fresh connection, while both certificates rotate every 0.3 s."""
    total, workers = 2000, 8
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    stop = threading.Event()
    rotations = [0]

    def rotate() -> None:
        turn = 0
        while not stop.is_set():
            time.sleep(0.3)
            (mesh.server if turn % 2 == 0 else mesh.client).rotate()
            turn += 1
            rotations[0] = turn

    def work(n: int) -> None:
        rnd = random.Random(n)
        for _ in range(total // workers):
            payload = rnd.randbytes(rnd.randint(1, 4096))
            try:
                got = roundtrip(mesh.outbound_port, payload)
                if got != payload:
                    failures.append(f"mismatch {len(got)} != {len(payload)}")
            except OSError as exc:
                failures.append(repr(exc))
            with lock:
                done[0] += 1

    rotator = threading.Thread(target=rotate, daemon=True)
    rotator.start()
    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    stop.set()
    rotator.join()
    reloads = metric(mesh.server_proxy.metrics(), "meshtls_proxy_reloads_total", result="success") + metric(
        mesh.client_proxy.metrics(), "meshtls_proxy_reloads_total", result="success")
    resumed = metric(mesh.server_proxy.metrics(), "meshtls_proxy_resumed_handshakes_total", direction="inbound")
    print(f"\n{done[0]} requests in {elapsed:.1f}s ({done[0] / elapsed:.0f}/s), {len(failures)} failures, "
          f"{rotations[0]} rotations, {reloads:.0f} reloads, {resumed:.0f} resumed handshakes")
    assert failures == []
    assert done[0] == total
    assert rotations[0] >= 3
    _ = os.getpid()


def test_tls_versions_and_session_resumption(mesh: Mesh, tmp_path: Path) -> None:
    client = issue(mesh.ca, "client2")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl_client_context(client, mesh.ca.roots_pem, tmp_path / "v")
        ctx.maximum_version = ctx.minimum_version = version
        with socket.create_connection(("127.0.0.1", mesh.inbound_port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            tls.sendall(b"v")
            assert tls.recv(1) == b"v"
            assert tls.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    ctx = ssl_client_context(client, mesh.ca.roots_pem, tmp_path / "v")
    with pytest.warns(DeprecationWarning):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", mesh.inbound_port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw)
    # sidecar to sidecar: the second connection resumes
    for _ in range(3):
        assert roundtrip(mesh.outbound_port, b"r") == b"r"
    assert metric(mesh.client_proxy.metrics(), "meshtls_proxy_resumed_handshakes_total", direction="outbound") >= 1
    assert metric(mesh.server_proxy.metrics(), "meshtls_proxy_resumed_handshakes_total", direction="inbound") >= 1


def test_connection_of_a_certificate_revoked_while_open_is_cut(mesh: Mesh) -> None:
    """Rotation keeps old connections; revocation does not: the open connection of a revoked certificate is cut."""
    keep = Stream(mesh.outbound_port)
    _wait(lambda: keep.progress() > 50_000)
    old = mesh.client.cert
    mesh.client.rotate()  # superseded, not revoked: the stream keeps flowing
    mesh.client_log.wait_for("reloaded", f"serial={mesh.client.cert.serial_hex}")
    before = keep.progress()
    _wait(lambda: keep.progress() > before + 50_000)
    fresh = Stream(mesh.outbound_port)  # opened with the new certificate
    _wait(lambda: fresh.progress() > 50_000)

    mesh.server.revoke(old)
    line = mesh.server_log.wait_for("inbound connection cut", "reason=revoked")
    assert f"serial={old.serial_hex}" in line and mesh.client.spiffe_id in line
    _wait(lambda: keep.error is not None or not keep._reader.is_alive())
    before = fresh.progress()
    _wait(lambda: fresh.progress() > before + 50_000)  # the new certificate's connection is untouched
    fresh.finish()
    keep._stop.set()
    assert len(mesh.server_log.matching("inbound connection cut")) == 1


def test_expired_crl_is_loud_and_fails_closed(mesh: Mesh) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    stale = crl_pem(build_crl(mesh.ca, [], 7, past, validity=dt.timedelta(hours=1)))
    mesh.server.set_bundle(mesh.ca.roots_pem, stale)
    mesh.server_log.wait_for("a CRL in", "expired at", "refuses every peer")
    assert refused(mesh.outbound_port)
    mesh.server_log.wait_for("inbound rejected", "reason=crl_expired")
    mesh.server.set_bundle(mesh.ca.roots_pem, crl_pem(build_crl(mesh.ca, [], 8, dt.datetime.now(dt.UTC))))
    mesh.server_log.wait_for("reloaded", "crl_numbers=8")
    assert roundtrip(mesh.outbound_port, b"fresh CRL") == b"fresh CRL"
