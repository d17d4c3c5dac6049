"""The operator on the real control plane: issue, rotate, revoke, repair, refuse (issue #4's acceptance)."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, ready_condition, wait_for
from e2e.operator_process import OperatorProcess
from meshtls.pki import load_certificates, load_private_key_pem, svid_spiffe_id
from meshtls.pki.keys import public_keys_match

MANIFESTS = Path(__file__).parent / "manifests"


def leaf(data: dict[str, bytes]) -> x509.Certificate:
    return load_certificates(data["tls.crt"])[0]


def serial_of(data: dict[str, bytes]) -> str:
    return format(leaf(data).serial_number, "x")


def write_bundle(kube: Kube, namespace: str, out: Path) -> tuple[Path, Path]:
    bundle = kube.configmap_data(namespace, "meshtls-bundle")
    assert bundle is not None, f"no meshtls-bundle ConfigMap in {namespace}"
    (out / "ca.crt").write_text(bundle["ca.crt"])
    (out / "crl.pem").write_text(bundle["crl.pem"])
    return out / "ca.crt", out / "crl.pem"


def test_identity_is_issued_within_5s_and_verifies_against_the_bundle(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
    tmp_path: Path, openssl: str,
) -> None:
    start = time.monotonic()
    kube.create_identity(namespace, "web", {"serviceAccountName": "web", "trustDomain": trust_domain,
                                            "dnsNames": [f"web.{namespace}.svc"]})
    data = wait_for("the Secret web-mtls", lambda: kube.secret_data(namespace, "web-mtls"), 5)
    elapsed = time.monotonic() - start
    assert sorted(data) == ["ca.crt", "tls.crt", "tls.key"]
    (tmp_path / "tls.crt").write_bytes(data["tls.crt"])
    ca, crl = write_bundle(kube, namespace, tmp_path)
    verify = subprocess.run([openssl, "verify", "-crl_check", "-CRLfile", crl, "-CAfile", ca, tmp_path / "tls.crt"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert str(svid_spiffe_id(leaf(data))) == f"spiffe://{trust_domain}/ns/{namespace}/sa/web"
    identity = wait_for("Ready status", lambda: (b := kube.identity(namespace, "web")) and is_ready(b) and b, 5)
    assert identity["status"]["serialNumber"] == serial_of(data)
    table = cluster.kubectl("get", "wid", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    for column in ("READY", "SPIFFE ID", "SERIAL", "EXPIRES", "RENEWS"):
        assert column in header
    assert "True" in row and f"spiffe://{trust_domain}/ns/{namespace}/sa/web" in row and serial_of(data) in row
    events = kube.events(namespace, reason="Issued", name="web")
    assert events, "no Issued Event"
    print(f"issued in {elapsed:.2f} s")


def test_rotates_every_20s_ttl_and_a_watcher_never_sees_a_bad_secret(
    kube: Kube, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    kube.create_identity(namespace, "fast", {"serviceAccountName": "fast", "trustDomain": trust_domain, "ttl": "20s"})
    wait_for("the first certificate", lambda: kube.secret_data(namespace, "fast-mtls"), 10)
    seen: list[str] = []
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # polls every 200 ms as an app re-reading its mounted Secret would
        while not stop.is_set():
            data = kube.secret_data(namespace, "fast-mtls")
            now = dt.datetime.now(dt.UTC)
            if data is None:
                problems.append("Secret missing")
            else:
                cert = leaf(data)
                if cert.not_valid_after_utc <= now:
                    problems.append(f"expired certificate {cert.serial_number:x}")
                if not public_keys_match(cert.public_key(), load_private_key_pem(data["tls.key"]).public_key()):
                    problems.append(f"key does not match certificate {cert.serial_number:x}")
                serial = format(cert.serial_number, "x")
                if not seen or seen[-1] != serial:
                    seen.append(serial)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        time.sleep(60)
    finally:
        stop.set()
        watcher.join(5)
    assert not problems, problems[:5]
    assert len(seen) >= 4, f"only {len(seen) - 1} rotations in 60 s: {seen}"
    assert len(set(seen)) == len(seen), "a serial came back"
    rotated = kube.events(namespace, reason="Rotated", name="fast")
    assert len(rotated) >= 3
    messages = " ".join(e.message for e in rotated)
    for old, new in itertools.pairwise(seen):
        assert f"{old} -> {new}" in messages
    status = kube.identity(namespace, "fast")["status"]  # type: ignore[index]
    assert status["rotations"] >= 3 and status["serialNumber"] == seen[-1]
    print(f"{len(seen) - 1} rotations in 60 s, 0 bad reads")


def test_delete_revokes_publishes_the_crl_and_removes_the_secret(
    kube: Kube, namespace: str, trust_domain: str, running_operator: OperatorProcess, tmp_path: Path, openssl: str,
) -> None:
    kube.create_identity(namespace, "gone", {"serviceAccountName": "gone", "trustDomain": trust_domain})
    data = wait_for("the Secret", lambda: kube.secret_data(namespace, "gone-mtls"), 10)
    (tmp_path / "tls.crt").write_bytes(data["tls.crt"])
    start = time.monotonic()
    kube.delete_identity(namespace, "gone")

    def revoked() -> bool:
        ca, crl = write_bundle(kube, namespace, tmp_path)
        r = subprocess.run([openssl, "verify", "-crl_check", "-CRLfile", crl, "-CAfile", ca, tmp_path / "tls.crt"],
                           capture_output=True, text=True)
        return r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr

    wait_for("openssl to report the certificate revoked", revoked, 10)
    wait_for("the Secret to be gone", lambda: kube.secret_data(namespace, "gone-mtls") is None, 10)
    wait_for("the identity to be gone", lambda: kube.identity(namespace, "gone") is None, 10)
    elapsed = time.monotonic() - start
    events = wait_for("a Revoked Event", lambda: kube.events(namespace, reason="Revoked", name="gone"), 5)
    assert serial_of(data) in events[0].message
    print(f"revoked and cleaned up in {elapsed:.2f} s")


def test_overdue_identity_rotates_within_10s_of_operator_restart(
    kube: Kube, namespace: str, trust_domain: str, operator: OperatorProcess,
) -> None:
    if not operator.running:
        operator.start()
    kube.create_identity(namespace, "late", {"serviceAccountName": "late", "trustDomain": trust_domain, "ttl": "20s"})
    data = wait_for("the first certificate", lambda: kube.secret_data(namespace, "late-mtls"), 10)
    first = serial_of(data)
    operator.stop()
    try:
        renewal = dt.datetime.fromisoformat(
            wait_for("renewalTime", lambda: (kube.identity(namespace, "late") or {}).get("status", {})
                     .get("renewalTime"), 5).replace("Z", "+00:00"))
        time.sleep(max(0.0, (renewal - dt.datetime.now(dt.UTC)).total_seconds()) + 2)
        assert serial_of(kube.secret_data(namespace, "late-mtls") or {}) == first, "rotated while stopped?"
    finally:
        operator.start()
    started = time.monotonic()
    wait_for("a rotation after restart",
             lambda: serial_of(kube.secret_data(namespace, "late-mtls") or {}) != first, 10)
    print(f"overdue identity rotated {time.monotonic() - started:.2f} s after the operator became healthy")


def test_foreign_secret_is_untouched_and_reported_as_conflict(
    kube: Kube, kube_api: client.ApiClient, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="db-mtls"), string_data={"password": "hunter2"}))
    before = core.read_namespaced_secret("db-mtls", namespace)
    kube.create_identity(namespace, "db", {"serviceAccountName": "db", "trustDomain": trust_domain})
    cond = wait_for("SecretConflict", lambda: (c := ready_condition(kube.identity(namespace, "db")))
                    .get("reason") == "SecretConflict" and c, 10)
    assert cond["status"] == "False" and "will not overwrite" in cond["message"]
    warnings = wait_for("a Warning Event", lambda: kube.events(namespace, reason="SecretConflict", name="db"), 5)
    assert warnings[0].type == "Warning"
    time.sleep(2)
    after = core.read_namespaced_secret("db-mtls", namespace)
    assert after.data == before.data and after.metadata.resource_version == before.metadata.resource_version
    assert after.metadata.labels == before.metadata.labels and after.type == before.type


def test_tampered_and_deleted_secrets_are_repaired(
    kube: Kube, kube_api: client.ApiClient, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    core = client.CoreV1Api(kube_api)
    kube.create_identity(namespace, "api", {"serviceAccountName": "api", "trustDomain": trust_domain})
    first = serial_of(wait_for("the Secret", lambda: kube.secret_data(namespace, "api-mtls"), 10))
    core.patch_namespaced_secret("api-mtls", namespace, {"stringData": {"tls.key": "garbage"}})
    repaired = wait_for("repair after tampering", lambda: (d := kube.secret_data(namespace, "api-mtls"))
                        and serial_of(d) != first and d, 10)
    assert public_keys_match(leaf(repaired).public_key(), load_private_key_pem(repaired["tls.key"]).public_key())
    second = serial_of(repaired)
    core.delete_namespaced_secret("api-mtls", namespace)
    wait_for("repair after deletion", lambda: (d := kube.secret_data(namespace, "api-mtls")) and serial_of(d) != second,
             10)
    assert len(wait_for("Repaired Events", lambda: len(kube.events(namespace, reason="Repaired", name="api")) >= 2
                        and kube.events(namespace, reason="Repaired", name="api"), 5)) >= 2


def test_revoke_annotation_revokes_and_reissues(
    kube: Kube, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    kube.create_identity(namespace, "oops", {"serviceAccountName": "oops", "trustDomain": trust_domain})
    first = serial_of(wait_for("the Secret", lambda: kube.secret_data(namespace, "oops-mtls"), 10))
    kube.patch_identity(namespace, "oops", {"metadata": {"annotations": {"meshtls.dev/revoke": "keyCompromise"}}})
    wait_for("a new certificate", lambda: (d := kube.secret_data(namespace, "oops-mtls")) and serial_of(d) != first,
             10)

    def on_crl() -> bool:
        bundle = kube.configmap_data(namespace, "meshtls-bundle") or {}
        crl = x509.load_pem_x509_crl(bundle.get("crl.pem", "").encode())
        return crl.get_revoked_certificate_by_serial_number(int(first, 16)) is not None

    wait_for("the old serial on the CRL", on_crl, 10)
    wait_for("the annotation to be cleared",
             lambda: "meshtls.dev/revoke" not in (kube.identity(namespace, "oops") or {})["metadata"].get(
                 "annotations", {}), 10)


@pytest.mark.parametrize("manifest", sorted((MANIFESTS / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_manifests_are_refused_with_the_field(cluster: Cluster, crds: None, namespace: str,
                                                      manifest: Path) -> None:
    expect = manifest.read_text().splitlines()[0].removeprefix("# expect:").strip()
    result = cluster.kubectl("apply", "-n", namespace, "-f", str(manifest), check=False)
    assert result.returncode != 0, f"{manifest.name} was accepted:\n{result.stdout}"
    assert expect in result.stderr, f"{manifest.name}: expected {expect!r} in:\n{result.stderr}"
