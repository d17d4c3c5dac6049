"""Envoy as a real process, from the files meshtls renders: every golden starts and warms; a pair on loopback
carries traffic with the hybrid post-quantum group, refuses a peer not on the allow-list, and follows the kubelet's
volume swaps (a revocation, a rotation) without a restart. Certificates from meshtls.pki, volumes written the
kubelet's way."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from testsupport.envoy import EnvoyProcess
from testsupport.proxymesh import ProxyThread, TcpApp, Workload, echo, free_ports, refused, roundtrip, running

from meshtls.dataplane.config import InboundRoute, OutboundRoute, SidecarConfig, parse_sidecar_config
from meshtls.dataplane.layout import CERT_FILE, KEY_FILE
from meshtls.pki import CertificateAuthority

WALL_CLOCK = True  # Envoy judges the certificates against the real time (see conftest)

pytestmark = pytest.mark.timeout(60)
GOLDEN = Path(__file__).parent / "golden" / "envoy"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))


def load_input(name: str) -> SidecarConfig:
    return parse_sidecar_config(yaml.safe_load((GOLDEN / f"{name}.in.yaml").read_text()))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def warnings_in(log: str) -> list[str]:
    # SIGTERM is logged at warning level by design: it is how the pod stops Envoy
    return [line for line in log.splitlines()
            if re.search(r"\]\[(warning|error|critical)\]", line) and "caught ENVOY_SIGTERM" not in line]


def relocated(config: SidecarConfig, workload: Workload) -> SidecarConfig:
    """The same routes on free ports (golden ports like 8443 may be taken here), with the workload's volumes."""
    ports = iter(free_ports(1 + 2 * len(config.inbound) + 2 * len(config.outbound)))
    return SidecarConfig(
        spiffe_id=config.spiffe_id, identity_dir=str(workload.identity_dir), bundle_dir=str(workload.bundle_dir),
        inbound=tuple(InboundRoute(next(ports), next(ports), r.allow) for r in config.inbound),
        outbound=tuple(OutboundRoute(next(ports), r.address.rpartition(":")[0] + f":{next(ports)}", r.peer)
                       for r in config.outbound),
        admin_port=next(ports))


def serving_problems(envoy: EnvoyProcess, listeners: int) -> list[str]:
    """Why a started Envoy would not serve as rendered: listeners not all active, an SDS secret rejected (Envoy
    activates the listener anyway), anything logged at warning or above."""
    stats = envoy.stats()
    problems = [f"{k}={v}" for k, v in stats.items() if k.endswith(".update_rejected") and v]
    if stats.get("listener_manager.total_listeners_active") != listeners or \
            stats.get("listener_manager.total_listeners_warming"):
        problems.append(f"listeners: {listeners} expected, {stats.get('listener_manager.total_listeners_active')} "
                        f"active, {stats.get('listener_manager.total_listeners_warming')} warming")
    return problems + warnings_in(envoy.log())


@pytest.mark.parametrize("name", CASES)
def test_envoy_serves_every_golden(name: str, tmp_path: Path, ca: CertificateAuthority) -> None:
    """Validate mode loads SDS files only for STATIC clusters; a real start warms every listener and cluster."""
    workload = Workload("backend", tmp_path, ca)
    config = relocated(load_input(name), workload)
    envoy = EnvoyProcess(config, tmp_path / "config")
    with envoy:
        assert serving_problems(envoy, len(config.inbound) + len(config.outbound)) == []
        status, body = envoy.get("/stats/prometheus")
        assert status == 200 and "envoy_server_live{} 1" in body, body
    assert envoy.proc is not None and envoy.proc.returncode == 0, envoy.log()
    assert warnings_in(envoy.log()) == []


def pair_configs(server: Workload, client: Workload, app_port: int) -> tuple[SidecarConfig, SidecarConfig, int, int]:
    """backend's sidecar serves the app on 127.0.0.1:app_port to frontend only; frontend's originates TLS to it."""
    inbound, outbound, server_admin, client_admin = free_ports(4)
    server_config = parse_sidecar_config({
        "spiffeId": server.spiffe_id, "identityDir": str(server.identity_dir), "bundleDir": str(server.bundle_dir),
        "inbound": [{"port": inbound, "appPort": app_port, "allow": [client.spiffe_id]}],
        "admin": {"port": server_admin}})
    client_config = parse_sidecar_config({
        "spiffeId": client.spiffe_id, "identityDir": str(client.identity_dir), "bundleDir": str(client.bundle_dir),
        "outbound": [{"listenPort": outbound, "address": f"127.0.0.1:{inbound}", "peer": server.spiffe_id}],
        "admin": {"port": client_admin}})
    return server_config, client_config, inbound, outbound


@pytest.fixture
def pair(tmp_path: Path, ca: CertificateAuthority) -> Iterator[tuple[Workload, Workload, EnvoyProcess, EnvoyProcess,
                                                                   int, int]]:
    """backend's Envoy serves an echo app to frontend only; frontend's Envoy originates TLS to it."""
    server, client = Workload("backend", tmp_path, ca), Workload("frontend", tmp_path, ca)
    app = TcpApp(echo)
    server_config, client_config, inbound, outbound = pair_configs(server, client, app.port)
    try:
        with EnvoyProcess(server_config, tmp_path / "backend" / "config", "server") as envoy_server, \
                EnvoyProcess(client_config, tmp_path / "frontend" / "config", "client") as envoy_client:
            yield server, client, envoy_server, envoy_client, inbound, outbound
            assert warnings_in(envoy_server.log()) == [] and warnings_in(envoy_client.log()) == []
    finally:
        app.close()


def test_envoy_pair_on_loopback(pair: tuple[Workload, Workload, EnvoyProcess, EnvoyProcess, int, int],
                                tmp_path: Path, ca: CertificateAuthority) -> None:
    server, client, envoy_server, envoy_client, inbound, outbound = pair
    listener, cluster = f"listener.0.0.0.0_{inbound}.ssl", f"cluster.outbound_{outbound}.ssl"

    # 1. traffic passes, both ends negotiate the hybrid post-quantum group, TLS 1.3
    for i in range(20):
        payload = f"request {i} ".encode() * (1 + i * 500)
        assert roundtrip(outbound, payload) == payload
    for envoy, prefix in ((envoy_server, listener), (envoy_client, cluster)):
        stats = envoy.stats()
        assert stats[f"{prefix}.curves.X25519MLKEM768"] == 20, stats
        assert stats[f"{prefix}.versions.TLSv1.3"] == 20
    assert envoy_server.stat(f"inbound_{inbound}.rbac.allowed") == 20
    _, prometheus = envoy_server.get("/stats/prometheus")
    assert re.search(r'envoy_listener_ssl_curves\{envoy_ssl_curve="X25519MLKEM768",envoy_listener_address='
                     rf'"0\.0\.0\.0_{inbound}"\}} 20', prometheus), prometheus

    # 2. a peer of the same CA that is not on the allow-list completes TLS (classical group: Python's OpenSSL has no
    #    ML-KEM) and is cut by the RBAC filter before one byte reaches the app
    intruder = Workload("intruder", tmp_path, ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.roots_pem.decode())
    context.load_cert_chain(str(intruder.identity_dir / CERT_FILE), str(intruder.identity_dir / KEY_FILE))
    with socket.create_connection(("127.0.0.1", inbound), timeout=5) as raw, context.wrap_socket(raw) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(b"let me in")
        try:
            answer = tls.recv(100)
        except (ssl.SSLError, OSError):
            answer = b""
        assert answer == b""
    assert envoy_server.stat(f"inbound_{inbound}.rbac.denied") == 1
    classical = {k: v for k, v in envoy_server.stats().items() if k.startswith(f"{listener}.curves.") and v}
    assert classical == {f"{listener}.curves.X25519MLKEM768": 20, f"{listener}.curves.X25519": 1}, classical
    # no certificate at all: the handshake itself fails
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.roots_pem.decode())
    with pytest.raises((ssl.SSLError, OSError)), socket.create_connection(("127.0.0.1", inbound), timeout=5) as raw, \
            bare.wrap_socket(raw) as tls:
        tls.sendall(b"hello")
        assert tls.recv(100) == b""  # TLS 1.3: the server's alert may come only at the first read
        raise ssl.SSLError("closed without an answer")

    # 3. the kubelet swaps the bundle with a CRL revoking the client's certificate: refused, no restart
    updates = envoy_server.stat(f"listener.0.0.0.0_{inbound}.server_ssl_socket_factory.ssl_context_update_by_sds")
    server.revoke(client.cert)
    took = wait_until(lambda: refused(outbound), 10, "the revoked client refused")
    assert envoy_server.stat(f"{listener}.fail_verify_error") >= 1
    assert envoy_server.stat(f"listener.0.0.0.0_{inbound}.server_ssl_socket_factory.ssl_context_update_by_sds") \
        > updates
    print(f"revoked certificate refused {took:.3f} s after the bundle swap")

    # 4. ... and a rotated client certificate goes through again, picked up from the identity volume's swap
    client_updates = envoy_client.stat(f"cluster.outbound_{outbound}.client_ssl_socket_factory."
                                       "ssl_context_update_by_sds")
    client.rotate()
    wait_until(lambda: envoy_client.stat(f"cluster.outbound_{outbound}.client_ssl_socket_factory."
                                         "ssl_context_update_by_sds") > client_updates, 10, "the client reloaded")
    assert roundtrip(outbound, b"rotated") == b"rotated"
    assert envoy_server.proc is not None and envoy_server.proc.poll() is None  # the same processes throughout


def test_serving_check_can_fail(tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    """A key that does not match the certificate: Envoy rejects the SDS update (and, worth knowing for readiness,
    still says LIVE with the listener active: only the rejection counters and the log tell)."""
    workload = Workload("backend", tmp_path, ca)
    stranger = Workload("stranger", tmp_path, other_ca)
    (workload.identity_dir / KEY_FILE).unlink()  # a kubelet-style symlink: replaced by a plain file
    (workload.identity_dir / KEY_FILE).write_bytes(stranger.cert.key_pem)
    with EnvoyProcess(relocated(load_input("inbound-only"), workload), tmp_path / "config") as envoy:
        problems = serving_problems(envoy, 1)
        assert any(".update_rejected=" in p for p in problems), problems
        assert any("KEY_VALUES_MISMATCH" in p for p in problems), problems


def test_open_connection_outlives_revocation(pair: tuple[Workload, Workload, EnvoyProcess, EnvoyProcess, int, int]
                                             ) -> None:
    """Parity, written down (issue #15): Envoy refuses new handshakes of a revoked certificate but leaves a
    connection opened before the CRL swap alone; meshtls-proxy cuts it. When this fails, Envoy closed the gap."""
    server, client, _, _, _, outbound = pair
    with socket.create_connection(("127.0.0.1", outbound), timeout=5) as open_conn:
        open_conn.sendall(b"before")
        assert open_conn.recv(100) == b"before"
        server.revoke(client.cert)
        wait_until(lambda: refused(outbound), 10, "the revoked client refused")
        open_conn.sendall(b"after")
        assert open_conn.recv(100) == b"after"


def test_a_stream_far_beyond_the_buffer_limit_flows_both_ways(tmp_path: Path, ca: CertificateAuthority) -> None:
    """The rendered 32 KiB per-connection buffer limit is backpressure, not a size cap: an app that reads only once
    the server's Envoy has paused reading from its peer (its buffer toward the app full) still gets 32 MiB intact,
    and echoes it back through both Envoys while the client is still sending."""
    server, client = Workload("backend", tmp_path, ca), Workload("frontend", tmp_path, ca)
    size = 32 << 20
    payload = random.Random(15).randbytes(size)
    holder: dict[str, EnvoyProcess] = {}

    def slow_echo(conn: socket.socket) -> None:
        envoy = holder["server"]
        wait_until(lambda: envoy.stat(f"tcp.inbound_{inbound}.downstream_flow_control_paused_reading_total") > 0,
                   30, "the server's Envoy paused reading from its peer")
        echo(conn)

    app = TcpApp(slow_echo)
    server_config, client_config, inbound, outbound = pair_configs(server, client, app.port)
    received = bytearray()
    try:
        with EnvoyProcess(server_config, tmp_path / "backend" / "config", "server") as envoy_server, \
                EnvoyProcess(client_config, tmp_path / "frontend" / "config", "client") as envoy_client:
            holder["server"] = envoy_server
            live = {c["@type"].rsplit(".", 1)[1]: c for c in json.loads(envoy_server.get("/config_dump")[1])["configs"]}
            limits = [x["listener"]["per_connection_buffer_limit_bytes"]
                      for x in live["ListenersConfigDump"]["static_listeners"]]
            limits += [x["cluster"]["per_connection_buffer_limit_bytes"]
                       for x in live["ClustersConfigDump"]["static_clusters"]]
            assert limits == [32768, 32768]  # Envoy runs with the rendered limit: its listener and its cluster
            with socket.create_connection(("127.0.0.1", outbound), timeout=30) as conn:
                def send() -> None:
                    conn.sendall(payload)
                    conn.shutdown(socket.SHUT_WR)

                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                while chunk := conn.recv(1 << 20):
                    received += chunk
                sender.join(30)
            paused = envoy_server.stat(f"tcp.inbound_{inbound}.downstream_flow_control_paused_reading_total")
            print(f"{size >> 20} MiB echoed through two Envoys; the server's paused reading {paused} times")
            assert warnings_in(envoy_server.log()) == [] and warnings_in(envoy_client.log()) == []
    finally:
        app.close()
    assert len(received) == size and hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize("envoy_side", ["server", "client"])
def test_envoy_and_meshtls_proxy_interoperate(envoy_side: str, tmp_path: Path, ca: CertificateAuthority) -> None:
    """Mixed pairs: each rendering of the one model talks to the other; the group falls back to a classical one
    unless this Python's OpenSSL has ML-KEM (3.5 and later)."""
    server, client = Workload("backend", tmp_path, ca), Workload("frontend", tmp_path, ca)
    app = TcpApp(echo)
    inbound, outbound = free_ports(2)
    server_config = server.config(inbound=[{"port": inbound, "appPort": app.port,
                                            "allow": ["spiffe://example.org/ns/default/sa/*"]}])
    client_config = client.config(outbound=[{"listenPort": outbound, "address": f"127.0.0.1:{inbound}",
                                             "peer": server.spiffe_id}])
    envoy_config, proxy_config = (server_config, client_config) if envoy_side == "server" else (client_config,
                                                                                                 server_config)
    envoy = EnvoyProcess(parse_sidecar_config(envoy_config), tmp_path / "envoy-config", f"envoy-{envoy_side}")
    try:
        with envoy, running(ProxyThread(proxy_config, "meshtls-proxy")):
            for i in range(5):
                assert roundtrip(outbound, b"mixed %d" % i) == b"mixed %d" % i
            prefix = f"listener.0.0.0.0_{inbound}.ssl" if envoy_side == "server" else f"cluster.outbound_{outbound}.ssl"
            curves = {k.rsplit(".", 1)[1]: v for k, v in envoy.stats().items() if k.startswith(f"{prefix}.curves.")
                      and v}
            expected = "X25519MLKEM768" if ssl.OPENSSL_VERSION_INFO >= (3, 5) else "X25519"
            assert curves == {expected: 5}, curves
    finally:
        app.close()
