"""`meshtls-envoy`, the pod side of the Envoy data plane: `run` execs the wheel's Envoy, `ready` (the exec probe)
says ready only while Envoy serves the mounted certificate, `drain` (the preStop hook) drains the inbound listeners
and leaves the outbound ones to the app. Against a real Envoy with volumes written the kubelet's way."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testsupport.envoy import EnvoyProcess
from testsupport.kubelet import identity_files, write_atomic_volume
from testsupport.proxymesh import TcpApp, Workload, echo, free_ports, issue

from meshtls.dataplane.config import parse_sidecar_config
from meshtls.dataplane.envoy import envoy_arguments
from meshtls.dataplane.layout import CERT_FILE
from meshtls.pki import CertificateAuthority, generate_ca, load_certificates
from meshtls.pki.keys import KeyAlgorithm
from meshtls.proxy.envoy_bin import ENVOY_VERSION
from meshtls.proxy.envoy_launcher import NotReady, check_ready, leaf_serial

WALL_CLOCK = True
pytestmark = pytest.mark.timeout(60)
LAUNCHER = Path(sys.executable).parent / "meshtls-envoy"


def launcher(*args: str) -> subprocess.CompletedProcess[str]:
    assert LAUNCHER.exists(), f"{LAUNCHER} is missing: reinstall the package (make venv) for its console scripts"
    return subprocess.run([str(LAUNCHER), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_the_serial_read_without_cryptography_is_the_certificates(algorithm: KeyAlgorithm,
                                                                   ca: CertificateAuthority) -> None:
    for _ in range(8):  # serials of every length class (leading zero bytes, high bit set)
        chain = issue(ca, "backend").cert_chain_pem if algorithm is KeyAlgorithm.ECDSA_P256 else \
            generate_ca("example.org", dt.datetime.now(dt.UTC), algorithm=algorithm).certificate_pem()
        assert leaf_serial(chain) == load_certificates(chain)[0].serial_number


@pytest.mark.parametrize("text", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_a_file_without_a_certificate_is_not_ready(text: bytes) -> None:
    with pytest.raises((NotReady, ValueError, IndexError)):
        leaf_serial(text)


@pytest.fixture
def server(tmp_path: Path, ca: CertificateAuthority) -> Iterator[tuple[Workload, EnvoyProcess, int, int]]:
    workload = Workload("backend", tmp_path, ca)
    app = TcpApp(echo)
    inbound, outbound, admin = free_ports(3)
    config = parse_sidecar_config({
        "spiffeId": workload.spiffe_id, "identityDir": str(workload.identity_dir),
        "bundleDir": str(workload.bundle_dir),
        "inbound": [{"port": inbound, "appPort": app.port, "allow": ["*"]}],
        "outbound": [{"listenPort": outbound, "address": f"127.0.0.1:{inbound}", "peer": workload.spiffe_id}],
        "admin": {"port": admin}})
    envoy = EnvoyProcess(config, tmp_path / "config").start()
    yield workload, envoy, inbound, outbound
    envoy.stop()
    app.close()


def test_ready_follows_the_certificate_envoy_serves(server: tuple[Workload, EnvoyProcess, int, int],
                                                    ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    workload, envoy, _, _ = server
    admin = envoy.config.admin_port
    cert_file = str(workload.identity_dir / CERT_FILE)
    assert f"{workload.cert.serial_hex.lstrip('0')}" in check_ready(admin, cert_file)
    assert "2 TLS contexts" in check_ready(admin, cert_file)  # the inbound listener and the outbound cluster
    result = launcher("ready", "--admin-port", str(admin), "--cert", cert_file)
    assert result.returncode == 0, result.stderr

    # a new certificate with a key that does not match: Envoy rejects the SDS update and keeps the old one,
    # still saying LIVE on /ready; the probe says not ready, naming both serials
    rejected = envoy.stat("sds.identity.update_rejected")
    fresh, stranger = issue(ca, "backend"), issue(other_ca, "backend")
    write_atomic_volume(workload.identity_dir, identity_files(fresh.cert_chain_pem, stranger.key_pem, ca.roots_pem))
    deadline = time.monotonic() + 10
    while envoy.stat("sds.identity.update_rejected") == rejected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert envoy.get("/ready") == (200, "LIVE\n")
    with pytest.raises(NotReady, match=f"serves certificate {workload.cert.serial_hex.lstrip('0')}"):
        check_ready(admin, cert_file)
    result = launcher("ready", "--admin-port", str(admin), "--cert", cert_file)
    assert result.returncode == 1 and "not ready" in result.stderr

    workload.rotate(fresh)  # the matching key arrives: ready again, with the new serial
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert fresh.serial_hex.lstrip("0") in check_ready(admin, cert_file)
            break
        except NotReady:
            time.sleep(0.05)
    else:
        raise AssertionError(f"not ready with the rotated certificate: {envoy.log()}")

    # judged against the clock too: a served certificate past its expiry is not ready
    with pytest.raises(NotReady, match="expired"):
        check_ready(admin, cert_file, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))


def test_ready_without_an_envoy_is_not_ready(tmp_path: Path, ca: CertificateAuthority) -> None:
    (admin,) = free_ports(1)
    workload = Workload("backend", tmp_path, ca)
    result = launcher("ready", "--admin-port", str(admin), "--cert", str(workload.identity_dir / CERT_FILE))
    assert result.returncode == 1 and "does not answer" in result.stderr


def test_drain_closes_the_inbound_listeners_and_keeps_the_outbound_ones(
        server: tuple[Workload, EnvoyProcess, int, int]) -> None:
    _, envoy, inbound, outbound = server
    assert envoy.config.inbound and "--drain-time-s" in envoy_arguments()
    with socket.create_connection(("127.0.0.1", outbound), timeout=5) as open_conn:
        open_conn.sendall(b"before")
        assert open_conn.recv(100) == b"before"
        started = time.monotonic()
        result = launcher("drain", "--admin-port", str(envoy.config.admin_port), "--seconds", "1")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 1  # the hook waits: the kubelet's SIGTERM comes after it
        open_conn.sendall(b"during")  # an open connection keeps flowing through the drain
        assert open_conn.recv(100) == b"during"
    deadline = time.monotonic() + 15  # the inbound listener stops at the end of Envoy's drain time (5 s)
    while time.monotonic() < deadline and envoy.stat("listener_manager.listener_stopped") != 1:
        time.sleep(0.1)
    assert envoy.stat("listener_manager.listener_stopped") == 1, envoy.get("/listeners")
    with pytest.raises(OSError):  # no new connection from peers
        socket.create_connection(("127.0.0.1", inbound), timeout=2).close()
    socket.create_connection(("127.0.0.1", outbound), timeout=2).close()  # the app may still call out


def test_run_execs_the_wheels_envoy() -> None:
    result = launcher("run", "--version")
    assert result.returncode == 0 and ENVOY_VERSION in result.stdout, result


@pytest.mark.parametrize("args", [[], ["start"], ["ready"], ["ready", "--admin-port", "1"], ["drain", "--seconds"]])
def test_usage_errors_say_what_is_missing(args: list[str]) -> None:
    result = launcher(*args)
    assert result.returncode == 2 and "usage: meshtls-envoy" in result.stderr
