"""The offline `meshtls pki` commands, run as a user would: the console script in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def meshtls(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("meshtls", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "meshtls.cli.main"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    out = tmp_path / "ca"
    r = meshtls("pki", "init-ca", "--trust-domain", "example.org", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "ca.key").stat().st_mode & 0o077 == 0  # the CA key is private to its owner
    return out


def test_issue_revoke_inspect_flow(tmp_path: Path, ca_dir: Path, openssl: str) -> None:
    web = tmp_path / "web"
    r = meshtls("pki", "issue", "--ca", ca_dir, "--spiffe-id", "spiffe://example.org/ns/shop/sa/web",
                "--dns", "web.shop.svc", "--ttl", "1h", "--out", web)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in web.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert subprocess.run([openssl, "verify", "-CAfile", ca_dir / "ca.crt", web / "tls.crt"]).returncode == 0
    crl = ca_dir / "crl.pem"
    r = meshtls("pki", "revoke", "--ca", ca_dir, "--cert", web / "tls.crt", "--crl", crl, "--reason", "keyCompromise")
    assert r.returncode == 0, r.stderr
    check = subprocess.run([openssl, "verify", "-crl_check", "-CRLfile", crl, "-CAfile", ca_dir / "ca.crt",
                            web / "tls.crt"], capture_output=True, text=True)
    assert check.returncode != 0 and "revoked" in check.stdout + check.stderr
    # a second revocation keeps the first entry and increases the CRL number
    other = tmp_path / "other"
    assert meshtls("pki", "issue", "--ca", ca_dir, "--spiffe-id", "spiffe://example.org/ns/shop/sa/api",
                   "--out", other).returncode == 0
    assert meshtls("pki", "revoke", "--ca", ca_dir, "--cert", other / "tls.crt", "--crl", crl).returncode == 0
    report = json.loads(meshtls("pki", "inspect", crl, "--json").stdout)
    assert report["crls"][0]["number"] == 2
    assert len(report["crls"][0]["revoked"]) == 2
    leaf = json.loads(meshtls("pki", "inspect", web / "tls.crt", "--json", "--ca-file", ca_dir / "ca.crt",
                              "--crl", crl).stdout)
    assert leaf["certificates"][0]["spiffeId"] == "spiffe://example.org/ns/shop/sa/web"
    assert leaf["verification"]["ok"] is False and "revoked" in leaf["verification"]["reason"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--spiffe-id", "http://bad"], "--spiffe-id"),
        (["--spiffe-id", "spiffe://example.org/ns/a/../b"], "--spiffe-id"),
        (["--spiffe-id", "spiffe://other.org/ns/a/sa/b"], "--spiffe-id"),
        (["--spiffe-id", "spiffe://example.org/x", "--ttl", "forever"], "--ttl"),
        (["--spiffe-id", "spiffe://example.org/x", "--ttl", "1s"], "--ttl"),
        (["--spiffe-id", "spiffe://example.org/x", "--key-algorithm", "dsa"], "--key-algorithm"),
        (["--spiffe-id", "spiffe://example.org/x", "--dns", "Bad_Name"], "--dns"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, ca_dir: Path, args: list[str],
                                                            field: str) -> None:
    out = tmp_path / "x"
    r = meshtls("pki", "issue", "--ca", ca_dir, *args, "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ca"]  # no staging directory left behind


def test_missing_ca_and_existing_ca_are_clear_errors(tmp_path: Path, ca_dir: Path) -> None:
    r = meshtls("pki", "issue", "--ca", tmp_path / "nope", "--spiffe-id", "spiffe://example.org/x",
                "--out", tmp_path / "o")
    assert r.returncode == 2 and "--ca" in r.stderr
    r = meshtls("pki", "init-ca", "--trust-domain", "example.org", "--out", ca_dir)
    assert r.returncode == 2 and "--force" in r.stderr
    r = meshtls("pki", "init-ca", "--trust-domain", "Bad Domain", "--out", tmp_path / "b")
    assert r.returncode == 2 and "trustDomain" in r.stderr and not (tmp_path / "b").exists()
