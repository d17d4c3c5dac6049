"""`meshtls-proxy` as a real process: config errors, probes, metrics, signals, memory, and two real sidecars."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testsupport.kubelet import SidecarProcess, proxy_command, write_atomic_volume
from testsupport.proxymesh import (
    TcpApp,
    Workload,
    echo,
    free_ports,
    metric,
    parse_metrics,
    refused,
    roundtrip,
)

from meshtls.pki import CertificateAuthority

WALL_CLOCK = True  # OpenSSL and the sidecars judge certificates against the real time (see conftest)

pytestmark = pytest.mark.timeout(60)
RSS_GOAL = 40 * 1024 * 1024


def _run(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text)
    return subprocess.run([*proxy_command(), "--config", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("config", "field"), [
    ("spiffeId: spiffe://example.org/ns/a/sa/b\ninbound: [{port: 8443, appPort: 70000, allow: []}]\n",
     "inbound[0].appPort"),
    ("inbound: []\n", "spiffeId"),
    ("spiffeId: spiffe://example.org/ns/a/sa/b\noutbound: [{listenPort: 1500, address: nohost, peer: x}]\n",
     "outbound[0].address"),
    ("spiffeId: spiffe://example.org/ns/a/sa/b\nreloadIntervalSeconds: 0\n", "reloadIntervalSeconds"),
    ("spiffeId: [unclosed\n", "config"),
])
def test_bad_config_exits_2_with_one_line_naming_the_field(config: str, field: str, tmp_path: Path) -> None:
    result = _run(config, tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "invalid config" in lines[0], result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([*proxy_command(), "--config", str(tmp_path / "nope.yaml")], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "cannot read config" in result.stderr


@pytest.fixture
def app() -> Iterator[TcpApp]:
    a = TcpApp(echo)
    yield a
    a.close()


def test_two_real_sidecars_probes_metrics_revocation_and_sigterm(
    tmp_path: Path, ca: CertificateAuthority, app: TcpApp
) -> None:
    server, client = Workload("server", tmp_path, ca), Workload("client", tmp_path, ca)
    inbound, outbound = free_ports(2)
    s = SidecarProcess(server.config(inbound=[{"port": inbound, "appPort": app.port, "allow": [client.spiffe_id]}]),
                       server.identity_dir, server.bundle_dir, tmp_path / "server-config")
    c = SidecarProcess(client.config(outbound=[{"listenPort": outbound, "address": f"127.0.0.1:{inbound}",
                                                "peer": server.spiffe_id}]),
                       client.identity_dir, client.bundle_dir, tmp_path / "client-config")
    with s, c:
        time.sleep(0.5)
        idle_rss = (s.rss_bytes(), c.rss_bytes())
        assert s.get("/healthz")[0] == 200
        status, body = s.get("/readyz")
        assert status == 200 and server.cert.serial_hex.encode() in body
        payload = os.urandom(1_000_000)
        assert roundtrip(outbound, payload) == payload
        for _ in range(200):
            assert roundtrip(outbound, b"ping") == b"ping"
        busy_rss = (s.rss_bytes(), c.rss_bytes())
        print(f"\nRSS idle: server {idle_rss[0] / 2**20:.1f} MiB, client {idle_rss[1] / 2**20:.1f} MiB; "
              f"after 201 connections: {busy_rss[0] / 2**20:.1f} / {busy_rss[1] / 2**20:.1f} MiB")
        assert max(idle_rss) <= RSS_GOAL
        text = s.metrics()
        parse_metrics(text)  # valid Prometheus text
        assert metric(text, "meshtls_proxy_handshakes_total", direction="inbound", result="success") == 201
        assert metric(text, "meshtls_proxy_ready") == 1
        s.wait_for_log(f"inbound accepted port={inbound}")
        assert client.spiffe_id in s.log()
        # at the default INFO level, the first connection of a peer certificate only, not one line per connection
        assert s.log().count("inbound accepted") == 1 and c.log().count("outbound connected") == 1

        server.revoke(client.cert)
        s.wait_for_log("crl_numbers=2")
        assert refused(outbound)
        s.wait_for_log("reason=revoked")

        # SIGTERM: clean and quick exit (nothing open)
        started = time.monotonic()
        assert c.stop() == 0
        assert s.stop() == 0
        assert time.monotonic() - started < 5
    assert "meshtls-proxy stopped" in s.log()


def test_sigterm_drains_open_connections(tmp_path: Path, ca: CertificateAuthority, app: TcpApp) -> None:
    """On SIGTERM inbound stops accepting, but an open connection may finish within the drain period."""
    server, client = Workload("server", tmp_path, ca), Workload("client", tmp_path, ca)
    inbound, outbound = free_ports(2)
    s = SidecarProcess(server.config(inbound=[{"port": inbound, "appPort": app.port, "allow": [client.spiffe_id]}]),
                       server.identity_dir, server.bundle_dir, tmp_path / "server-config",
                       extra_args=("--drain-seconds", "10"))
    c = SidecarProcess(client.config(outbound=[{"listenPort": outbound, "address": f"127.0.0.1:{inbound}",
                                                "peer": server.spiffe_id}]),
                       client.identity_dir, client.bundle_dir, tmp_path / "client-config")
    with s, c:
        conn = socket.create_connection(("127.0.0.1", outbound), timeout=5)
        conn.sendall(b"before")
        assert conn.recv(100) == b"before"
        assert s.process is not None
        s.process.send_signal(signal.SIGTERM)
        s.wait_for_log("draining")
        conn.sendall(b"during the drain")
        assert conn.recv(100) == b"during the drain"
        with pytest.raises(OSError):  # no new inbound connections
            socket.create_connection(("127.0.0.1", inbound), timeout=2).close()
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(100) == b""
        conn.close()
        assert s.process.wait(5) == 0
    assert "0 connections cut" in s.log()


def test_port_in_use_exits_1(tmp_path: Path, ca: CertificateAuthority) -> None:
    w = Workload("server", tmp_path, ca)
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        cfg = w.config(inbound=[{"port": port, "appPort": 9, "allow": []}])
        config_dir = tmp_path / "cfg"
        sidecar = SidecarProcess(cfg, w.identity_dir, w.bundle_dir, config_dir)
        sidecar.write_config()
        result = subprocess.run([*proxy_command(), "--config", str(sidecar.config_path)], capture_output=True,
                                text=True, timeout=30, env=os.environ | {"MESHTLS_PROXY_BIND_ADDRESS": "127.0.0.1"})
        assert result.returncode == 1
        assert "cannot listen" in result.stderr and str(port) in result.stderr
    finally:
        busy.close()


def test_config_is_read_through_the_kubelet_symlinks(tmp_path: Path, ca: CertificateAuthority) -> None:
    w = Workload("server", tmp_path, ca)
    sidecar = SidecarProcess(w.config(), w.identity_dir, w.bundle_dir, tmp_path / "cfg")
    with sidecar:
        assert (sidecar.config_dir / "..data").is_symlink()
        assert os.readlink(sidecar.config_path) == "..data/proxy.yaml"
        assert sidecar.get("/readyz")[0] == 200
        assert sidecar.get("/nope")[0] == 404
        # the kubelet updating the ConfigMap does not disturb the running proxy
        assert write_atomic_volume(sidecar.config_dir, {"proxy.yaml": sidecar.config_path.read_bytes() + b"\n"})
        time.sleep(0.3)
        assert sidecar.running and sidecar.get("/healthz")[0] == 200
