"""Interop with an independent TLS stack: OpenSSL's command line verifies what meshtls.pki makes."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from pathlib import Path

import pytest

from meshtls.pki import (
    CertificateAuthority,
    KeyAlgorithm,
    RevokedCertificate,
    build_crl,
    crl_pem,
    generate_ca,
    issue_svid,
    workload_spiffe_id,
)

WALL_CLOCK = True  # OpenSSL and the sidecars judge certificates against the real time (see conftest)

HOUR = dt.timedelta(hours=1)


def _write_identity(directory: Path, ca: CertificateAuthority, name: str, algorithm: KeyAlgorithm) -> Path:
    issued = issue_svid(ca, workload_spiffe_id("example.org", "shop", name), dt.datetime.now(dt.UTC), HOUR,
                        [f"{name}.shop.svc"], algorithm)
    d = directory / name
    d.mkdir()
    (d / "tls.crt").write_bytes(issued.cert_chain_pem)
    (d / "tls.key").write_bytes(issued.key_pem)
    (d / "ca.crt").write_bytes(issued.ca_pem)
    return d


def _s_server(openssl: str, port: int, identity: Path) -> subprocess.Popen[str]:
    """`openssl s_server` requiring a client certificate from `identity`'s CA, for one connection."""
    return subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", identity / "tls.crt", "-key",
         identity / "tls.key", "-CAfile", identity / "ca.crt", "-Verify", "2", "-verify_return_error", "-naccept", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_openssl_verify_accepts_chain_and_reports_revocation(tmp_path: Path, ca: CertificateAuthority,
                                                             openssl: str) -> None:
    web = _write_identity(tmp_path, ca, "web", KeyAlgorithm.ECDSA_P256)
    ok = subprocess.run([openssl, "verify", "-CAfile", web / "ca.crt", web / "tls.crt"], capture_output=True, text=True)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr

    from cryptography import x509

    leaf = x509.load_pem_x509_certificate((web / "tls.crt").read_bytes())
    now = dt.datetime.now(dt.UTC)
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(crl_pem(build_crl(ca, [], 1, now)))
    clean = subprocess.run([openssl, "verify", "-crl_check", "-CRLfile", crl_file, "-CAfile", web / "ca.crt",
                            web / "tls.crt"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    crl_file.write_bytes(crl_pem(build_crl(ca, [RevokedCertificate(leaf.serial_number, now, leaf.not_valid_after_utc)],
                                           2, now)))
    revoked = subprocess.run([openssl, "verify", "-crl_check", "-CRLfile", crl_file, "-CAfile", web / "ca.crt",
                              web / "tls.crt"], capture_output=True, text=True)
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr


def test_openssl_verify_rejects_another_ca(tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority,
                                           openssl: str) -> None:
    web = _write_identity(tmp_path, ca, "web", KeyAlgorithm.ECDSA_P256)
    (tmp_path / "other.crt").write_bytes(other_ca.certificate_pem())
    result = subprocess.run([openssl, "verify", "-CAfile", tmp_path / "other.crt", web / "tls.crt"],
                            capture_output=True, text=True)
    assert result.returncode != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ED25519, KeyAlgorithm.RSA_2048])
def test_mutual_handshake_with_openssl_s_server_and_s_client(tmp_path: Path, openssl: str,
                                                             algorithm: KeyAlgorithm) -> None:
    ca = generate_ca("example.org", dt.datetime.now(dt.UTC), algorithm=algorithm)
    server = _write_identity(tmp_path, ca, "server", algorithm)
    client = _write_identity(tmp_path, ca, "client", algorithm)
    port = _free_port()
    srv = _s_server(openssl, port, server)
    try:
        deadline = time.monotonic() + 10
        while srv.stdout is not None:
            line = srv.stdout.readline()
            if "ACCEPT" in line or time.monotonic() > deadline or not line:
                break
        cli = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-cert", client / "tls.crt", "-key",
             client / "tls.key", "-CAfile", client / "ca.crt", "-verify_return_error", "-brief"],
            input="hello from client\n", capture_output=True, text=True, timeout=20,
        )
        out, _ = srv.communicate(timeout=20)
    finally:
        srv.kill()
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "Verification: OK" in cli.stderr + cli.stdout
    assert "hello from client" in out, out  # the server accepted the client's certificate and read its bytes


def test_s_server_refuses_a_client_from_another_ca(tmp_path: Path, ca: CertificateAuthority,
                                                   other_ca: CertificateAuthority, openssl: str) -> None:
    server = _write_identity(tmp_path, ca, "server", KeyAlgorithm.ECDSA_P256)
    stranger = _write_identity(tmp_path, other_ca, "stranger", KeyAlgorithm.ECDSA_P256)
    port = _free_port()
    srv = _s_server(openssl, port, server)
    try:
        while srv.stdout is not None:
            line = srv.stdout.readline()
            if "ACCEPT" in line or not line:
                break
        subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-cert", stranger / "tls.crt", "-key",
             stranger / "tls.key", "-CAfile", server / "ca.crt", "-brief"],
            input="sneaky\n", capture_output=True, text=True, timeout=20,
        )
        out, _ = srv.communicate(timeout=20)
    finally:
        srv.kill()
    assert "sneaky" not in out
    assert "verify error" in out.lower() or "alert" in out.lower() or "error" in out.lower(), out
