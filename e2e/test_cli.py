"""The `meshtls` cluster commands on the real control plane, run as a user runs them: the console script in a
subprocess with KUBECONFIG pointing at the cluster (issue 7's acceptance)."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.harness import Cluster
from e2e.kube_helpers import GROUP, VERSION, Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess
from meshtls.pki import generate_ca, load_certificates

BIN = Path(sys.executable).parent


def meshtls(cluster: Cluster, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("meshtls", path=str(BIN))
    cmd = [exe] if exe else [sys.executable, "-m", "meshtls.cli.main"]
    env = {**cluster.env(), "NO_COLOR": "1"}
    env.pop("MESHTLS_NAMESPACE", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env)


def healthz(operator: OperatorProcess) -> str:
    return f"http://127.0.0.1:{operator.health_port}/healthz"


def create_ready(kube: Kube, namespace: str, name: str, trust_domain: str, **spec: Any) -> dict[str, Any]:
    kube.create_identity(namespace, name, {"serviceAccountName": name, "trustDomain": trust_domain, **spec})
    return wait_for(f"{namespace}/{name} Ready",
                    lambda: (b := kube.identity(namespace, name)) and is_ready(b)
                    and b.get("status", {}).get("serialNumber") and b, 15)


def serial_of(kube: Kube, namespace: str, secret: str) -> str:
    data = kube.secret_data(namespace, secret) or {}
    return format(load_certificates(data["tls.crt"])[0].serial_number, "x")


def lines_with(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def check_until(cluster: Cluster, args: list[str], want: int, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`meshtls check` until it exits `want`: identities other tests just created settle within seconds."""
    last: subprocess.CompletedProcess[str] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = meshtls(cluster, "check", *args)
        if last.returncode == want:
            return last
        time.sleep(1)
    assert last is not None
    raise AssertionError(f"meshtls check kept exiting {last.returncode}, wanted {want}:\n{last.stdout}{last.stderr}")


# --- status ----------------------------------------------------------------------------------------------------------


def test_status_lists_the_identities_the_test_created(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    web = create_ready(kube, namespace, "web", trust_domain, dnsNames=[f"web.{namespace}.svc"])
    api = create_ready(kube, namespace, "api", trust_domain, ttl="20m")
    r = meshtls(cluster, "status", "-A")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    for column in ("NAMESPACE", "NAME", "SPIFFE ID", "READY", "SERIAL", "EXPIRES IN", "RENEWS IN", "ROTATIONS",
                   "LAST ROTATION"):
        assert column in header
    for body in (web, api):
        name, serial = body["metadata"]["name"], body["status"]["serialNumber"]
        rows = lines_with(r.stdout, namespace, f" {name} ", f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}")
        assert len(rows) == 1, r.stdout
        assert "True" in rows[0] and serial in rows[0]
    assert "19m" in lines_with(r.stdout, namespace, " api ")[0]  # EXPIRES IN of a 20m certificate

    data = json.loads(meshtls(cluster, "status", "-n", namespace, "-o", "json").stdout)
    assert {(i["name"], i["serial"]) for i in data["items"]} == {("web", web["status"]["serialNumber"]),
                                                                 ("api", api["status"]["serialNumber"])}
    detail = meshtls(cluster, "status", "-n", namespace, "web")
    assert detail.returncode == 0, detail.stderr
    assert "Conditions:" in detail.stdout and "Issuing" in detail.stdout
    assert lines_with(detail.stdout, "Normal", "Issued", web["status"]["serialNumber"])
    as_yaml = yaml.safe_load(meshtls(cluster, "status", "-n", namespace, "web", "-o", "yaml").stdout)
    assert as_yaml["identity"]["serial"] == web["status"]["serialNumber"]
    assert [e["reason"] for e in as_yaml["events"]] == ["Issued"]


def test_unknown_names_namespaces_and_an_unreachable_cluster_are_one_line(
    cluster: Cluster, namespace: str, crds: None, tmp_path: Path,
) -> None:
    for args, expect in (
        (["status", "-n", namespace, "nope"], f"workloadidentity {namespace}/nope not found"),
        (["status", "-n", "no-such-namespace-e2e"], "namespace 'no-such-namespace-e2e' not found"),
        (["renew", "-n", namespace, "nope"], "not found"),
        (["inspect", "secret", "nope", "-n", namespace], f"secret {namespace}/nope not found"),
        (["status", "--context", "nope"], "no context 'nope'"),
    ):
        r = meshtls(cluster, *args)
        assert r.returncode != 0 and expect in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for c in config["clusters"]:
        c["cluster"]["server"] = "https://127.0.0.1:9"  # nothing listens on the discard port
    bad = tmp_path / "unreachable.kubeconfig"
    bad.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    r = meshtls(cluster, "status", "-A", "--kubeconfig", str(bad))
    assert r.returncode == 1 and r.stderr.strip() == ("meshtls: cannot reach the Kubernetes API at "
                                                      "https://127.0.0.1:9: connection refused")
    assert time.monotonic() - started < 15
    r = meshtls(cluster, "check", "--kubeconfig", str(bad))
    assert r.returncode == 1 and "✗ API server: cannot reach https://127.0.0.1:9" in r.stdout


def test_works_as_a_kubectl_plugin(cluster: Cluster, kube: Kube, namespace: str, trust_domain: str,
                                   running_operator: OperatorProcess) -> None:
    create_ready(kube, namespace, "plug", trust_domain)
    kubectl = shutil.which("kubectl", path=str(cluster.bin("kubectl").parent)) or "kubectl"
    env = {**cluster.env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([kubectl, "meshtls", "status", "-n", namespace], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert lines_with(r.stdout, namespace, "plug", "True")


# --- renew, revoke, watch --------------------------------------------------------------------------------------------


def test_renew_produces_a_rotated_event_within_5s(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    old = create_ready(kube, namespace, "web", trust_domain)["status"]["serialNumber"]
    started = time.monotonic()
    r = meshtls(cluster, "renew", "-n", namespace, "web", "-o", "json")
    wall = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    item = json.loads(r.stdout)["items"][0]
    assert item["oldSerial"] == old and item["newSerial"] and item["newSerial"] != old
    assert serial_of(kube, namespace, "web-mtls") == item["newSerial"]
    events = wait_for("a Rotated Event", lambda: [e for e in kube.events(namespace, reason="Rotated", name="web")
                                                  if f"{old} -> {item['newSerial']}" in e.message], 5)
    assert time.monotonic() - started < 5, f"Rotated Event after {time.monotonic() - started:.2f} s"
    assert "renewal requested" in events[0].message
    identity = kube.identity(namespace, "web") or {}
    assert identity["status"]["lastRenewRequest"] == item["request"]
    # --all renews every identity of the namespace, each once
    create_ready(kube, namespace, "api", trust_domain)
    r = meshtls(cluster, "renew", "--all", "-n", namespace)
    assert r.returncode == 0, r.stderr
    assert len(lines_with(r.stdout, "renewed in")) == 2
    print(f"renew: operator answered in {item['seconds']:.2f} s (CLI wall time {wall:.2f} s)")


def test_revoke_puts_the_serial_on_the_crl(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    create_ready(kube, namespace, "web", trust_domain)
    old = serial_of(kube, namespace, "web-mtls")
    (tmp_path / "old.crt").write_bytes((kube.secret_data(namespace, "web-mtls") or {})["tls.crt"])
    assert meshtls(cluster, "inspect", str(tmp_path / "old.crt"), "-n", namespace).returncode == 0
    started = time.monotonic()
    r = meshtls(cluster, "revoke", "web", "-n", namespace, "--reason", "keyCompromise", "-o", "json")
    wall = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["revokedSerial"] == old and result["newSerial"] and result["newSerial"] != old
    bundle = kube.configmap_data(namespace, "meshtls-bundle") or {}
    entry = x509.load_pem_x509_crl(bundle["crl.pem"].encode()).get_revoked_certificate_by_serial_number(int(old, 16))
    assert entry is not None, "the revoked serial is not on the namespace's CRL"
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert serial_of(kube, namespace, "web-mtls") == result["newSerial"]
    inspected = meshtls(cluster, "inspect", str(tmp_path / "old.crt"), "-n", namespace, "-o", "json")
    assert inspected.returncode == 1 and json.loads(inspected.stdout)["revoked"] is True
    current = meshtls(cluster, "inspect", "secret", "web-mtls", "-n", namespace)
    assert current.returncode == 0, current.stdout
    assert "accepts it" in current.stdout and "status.serialNumber matches" in current.stdout
    print(f"revoke: on the CRL after {result['onCrlAfterSeconds']:.2f} s, new serial after {result['seconds']:.2f} s "
          f"(CLI wall time {wall:.2f} s)")


def test_watch_streams_events_and_ctrl_c_ends_it_cleanly(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    exe = shutil.which("meshtls", path=str(BIN))
    cmd = [exe] if exe else [sys.executable, "-m", "meshtls.cli.main"]
    proc = subprocess.Popen([*cmd, "watch", "-n", namespace], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**cluster.env(), "NO_COLOR": "1"})
    lines: queue.Queue[str] = queue.Queue()
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None

    def read() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert "watching" in stderr.readline()
        time.sleep(1)  # the watch request is on its way once the banner is out
        create_ready(kube, namespace, "web", trust_domain)
        assert meshtls(cluster, "renew", "-n", namespace, "web", "--no-wait").returncode == 0
        seen: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("Rotated" in line for line in seen):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
        assert any(f"{namespace}/web  Issued" in line for line in seen), seen
        assert any(f"{namespace}/web  Rotated" in line and "renewal requested" in line for line in seen), seen
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
    assert "Traceback" not in stderr.read()


# --- check -----------------------------------------------------------------------------------------------------------


def test_check_passes_on_a_healthy_cluster(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    create_ready(kube, namespace, "web", trust_domain)
    r = check_until(cluster, ["--operator-url", healthz(running_operator)], 0)
    for line in ("✓ API server:", "✓ clock:", "✓ CRDs:", "✓ operator:", f"✓ TrustDomain {trust_domain}:",
                 "✓ WorkloadIdentities:", "✓ bundles:"):
        assert lines_with(r.stdout, line), f"no {line!r} in:\n{r.stdout}"
    assert "✗" not in r.stdout
    report = json.loads(meshtls(cluster, "check", "--operator-url", healthz(running_operator), "-n", namespace,
                                "-o", "json").stdout)
    assert report["ok"] is True and {c["check"] for c in report["checks"]} >= {"CRDs", "operator", "bundles"}


def test_check_fails_naming_the_operator_when_it_is_stopped(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, operator: OperatorProcess,
) -> None:
    if not operator.running:
        operator.start()
    operator.stop()
    try:
        r = meshtls(cluster, "check", "--operator-url", healthz(operator), "-n", namespace)
    finally:
        operator.start()
    assert r.returncode == 1, r.stdout
    failed = lines_with(r.stdout, "✗")
    assert len(failed) == 1 and failed[0].startswith("✗ operator:") and "connection refused" in failed[0], r.stdout
    # without --operator-url and with no heartbeat Lease or kopf peering, the check says how to point it at one
    nowhere = f"nowhere-{uuid.uuid4().hex[:6]}"
    r = meshtls(cluster, "check", "-n", namespace, "--operator-namespace", nowhere, "--peering", nowhere)
    assert r.returncode == 1 and lines_with(r.stdout, "✗ operator: no heartbeat")


def test_check_reads_the_operator_heartbeat_lease(cluster: Cluster, namespace: str, crds: None) -> None:
    """What the operator will publish (kube.queries.renew_heartbeat_lease), written here in a scratch namespace."""
    from meshtls.kube import connect
    from meshtls.kube.queries import HEARTBEAT_LEASE, release_heartbeat_lease, renew_heartbeat_lease

    kube = connect(str(cluster.kubeconfig))

    def operator_line() -> str:
        r = meshtls(cluster, "check", "-n", namespace, "--operator-namespace", namespace, "--peering", "none")
        lines = lines_with(r.stdout, "operator:")
        assert len(lines) == 1, r.stdout + r.stderr
        return lines[0]

    renew_heartbeat_lease(kube, namespace, "e2e-holder")
    renew_heartbeat_lease(kube, namespace, "e2e-holder")  # a renewal replaces the Lease
    line = operator_line()
    assert line.startswith("✓ operator: e2e-holder alive") and f"Lease {namespace}/{HEARTBEAT_LEASE}" in line
    release_heartbeat_lease(kube, namespace, "e2e-holder")
    assert operator_line().startswith("✗ operator: stopped")
    renew_heartbeat_lease(kube, namespace, "e2e-holder", now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    line = operator_line()
    assert line.startswith("✗ operator: no heartbeat for 2m"), line


def test_check_fails_naming_a_tampered_secret(
    kube: Kube, kube_api: client.ApiClient, cluster: Cluster, namespace: str, trust_domain: str,
    operator: OperatorProcess,
) -> None:
    if not operator.running:
        operator.start()
    core = client.CoreV1Api(kube_api)
    create_ready(kube, namespace, "web", trust_domain)
    create_ready(kube, namespace, "api", trust_domain)
    web_serial = serial_of(kube, namespace, "web-mtls")
    operator.stop()  # the running operator repairs tampering within a second
    try:
        core.patch_namespaced_secret("web-mtls", namespace, {"stringData": {"tls.key": "garbage"}})
        r = meshtls(cluster, "check", "-n", namespace, "--operator-url", healthz(operator))
        assert r.returncode == 1
        assert lines_with(r.stdout, f"✗ WorkloadIdentity {namespace}/web: Secret web-mtls is unusable: tls.key"), \
            r.stdout
        assert not lines_with(r.stdout, f"WorkloadIdentity {namespace}/api")
        # a valid pair, but not the one the status names: the other identity's certificate and key
        api = kube.secret_data(namespace, "api-mtls") or {}
        core.patch_namespaced_secret("web-mtls", namespace, {"data": {
            "tls.crt": _b64(api["tls.crt"]), "tls.key": _b64(api["tls.key"])}})
        r = meshtls(cluster, "check", "-n", namespace, "--operator-url", healthz(operator))
        assert r.returncode == 1
        api_serial = serial_of(kube, namespace, "api-mtls")
        assert lines_with(r.stdout, f"✗ WorkloadIdentity {namespace}/web: Secret web-mtls holds serial {api_serial}, "
                                    f"status.serialNumber is {web_serial}"), r.stdout
    finally:
        operator.start()
    wait_for("the repair", lambda: serial_of(kube, namespace, "web-mtls") not in (web_serial, api_serial), 15)
    check_until(cluster, ["-n", namespace, "--operator-url", healthz(operator)], 0)


def test_check_fails_naming_a_bundle_that_does_not_verify_an_identity(
    kube: Kube, kube_api: client.ApiClient, cluster: Cluster, namespace: str, operator: OperatorProcess,
) -> None:
    """Two TrustDomains serving one namespace, each with its own bundle ConfigMap. With the operator stopped (it
    would repair them at once) the bundles are broken one class at a time: the other trust domain's root only, the
    bundle deleted, the identity's serial on a CRL signed by its own CA. Each makes `check` exit 1 with a line naming
    the identity, the bundle and why; restarted, the operator repairs them and `check` passes."""
    from meshtls.pki import RevokedCertificate, build_crl, crl_pem, load_ca

    if not operator.running:
        operator.start()
    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    tds = {"a": f"a-{suffix}.meshtls.test", "b": f"b-{suffix}.meshtls.test"}
    bundle = {"a": "bundle-a", "b": "bundle-b"}
    try:
        for key, td in tds.items():
            kube.create_trust_domain(td, {"bundle": {"configMapName": bundle[key]}})
        for td in tds.values():
            wait_for(f"TrustDomain {td} Ready", lambda td=td: is_ready(kube.trust_domain(td)), 30)
        web = create_ready(kube, namespace, "web", tds["a"])["status"]["serialNumber"]
        api = create_ready(kube, namespace, "api", tds["b"])["status"]["serialNumber"]
        wait_for("both bundles published", lambda: all(kube.configmap_data(namespace, cm) for cm in bundle.values()),
                 15)
        args = ["-n", namespace, "--operator-url", healthz(operator)]
        check_until(cluster, args, 0)
        roots = {k: (kube.configmap_data(namespace, cm) or {})["ca.crt"] for k, cm in bundle.items()}

        def check_lines() -> dict[str, str]:
            r = meshtls(cluster, "check", *args)
            assert r.returncode == 1, r.stdout + r.stderr
            found = {}
            for name in ("web", "api"):
                rows = lines_with(r.stdout, f"✗ WorkloadIdentity {namespace}/{name}:")
                assert len(rows) <= 1, r.stdout
                found[name] = rows[0] if rows else ""
            return found

        operator.stop()  # the running operator repairs its bundles within a second
        # 1. bundle-a holds only trust domain b's root; 2. bundle-b is gone
        core.patch_namespaced_config_map(bundle["a"], namespace, {"data": {"ca.crt": roots["b"]}})
        core.delete_namespaced_config_map(bundle["b"], namespace)
        lines = check_lines()
        assert f"bundle {namespace}/bundle-a does not verify certificate {web}" in lines["web"], lines
        assert "no path to a trusted root" in lines["web"] and f"meshtls CA {tds['b']}" in lines["web"], lines
        assert f"bundle {namespace}/bundle-b does not verify certificate {api}" in lines["api"], lines
        assert "the bundle does not exist" in lines["api"], lines
        # 3. bundle-a back to its own root, with web's serial on a CRL signed by a's CA
        state = kube.secret_data("meshtls-system", f"meshtls-ca-{tds['a']}") or {}
        ca = load_ca(state["ca.crt"], state["ca.key"], dt.datetime.now(dt.UTC))
        now = dt.datetime.now(dt.UTC)
        crl = build_crl(ca, [RevokedCertificate(int(web, 16), now, now + dt.timedelta(hours=1))], 99, now,
                        dt.timedelta(hours=1))
        core.patch_namespaced_config_map(bundle["a"], namespace, {"data": {"ca.crt": roots["a"],
                                                                           "crl.pem": crl_pem(crl).decode()}})
        lines = check_lines()
        assert f"bundle {namespace}/bundle-a does not verify certificate {web}" in lines["web"], lines
        assert f"certificate {web} is revoked" in lines["web"], lines
        operator.start()
        started = time.monotonic()
        check_until(cluster, args, 0, timeout=60)
        print(f"check: bundles repaired and passing {time.monotonic() - started:.1f} s after the operator restarted")
    finally:
        if not operator.running:
            operator.start()
        for td in tds.values():
            kube.delete_trust_domain(td)


def test_check_judges_a_shared_bundle_for_every_trust_domain_it_serves(
    kube: Kube, kube_api: client.ApiClient, cluster: Cluster, namespace: str, operator: OperatorProcess,
) -> None:
    """Two TrustDomains publishing into one bundle ConfigMap of one namespace. Set, with the operator stopped, to
    hold trust domain a's root and CRL only, `check` names b's identity and the bundle line for b (before, the bundle
    was judged for one trust domain per namespace, whichever identity sorted last)."""
    from meshtls.pki import build_crl, crl_pem, load_ca

    if not operator.running:
        operator.start()
    core = client.CoreV1Api(kube_api)
    suffix = uuid.uuid4().hex[:6]
    tds = {"a": f"a-{suffix}.meshtls.test", "b": f"b-{suffix}.meshtls.test"}
    try:
        for td in tds.values():
            kube.create_trust_domain(td, {"bundle": {"configMapName": "shared-bundle"}})
        for td in tds.values():
            wait_for(f"TrustDomain {td} Ready", lambda td=td: is_ready(kube.trust_domain(td)), 30)
        web = create_ready(kube, namespace, "web", tds["a"])["status"]["serialNumber"]
        api = create_ready(kube, namespace, "api", tds["b"])["status"]["serialNumber"]
        wait_for("the shared bundle published", lambda: kube.configmap_data(namespace, "shared-bundle"), 15)
        operator.stop()
        state = kube.secret_data("meshtls-system", f"meshtls-ca-{tds['a']}") or {}
        now = dt.datetime.now(dt.UTC)
        ca = load_ca(state["ca.crt"], state["ca.key"], now)
        crl = build_crl(ca, [], 7, now, dt.timedelta(hours=1))
        core.patch_namespaced_config_map("shared-bundle", namespace, {"data": {
            "ca.crt": ca.roots_pem.decode(), "crl.pem": crl_pem(crl).decode()}})
        r = meshtls(cluster, "check", "-n", namespace, "--operator-url", healthz(operator))
        assert r.returncode == 1, r.stdout
        assert not lines_with(r.stdout, f"WorkloadIdentity {namespace}/web"), r.stdout  # a's chain verifies
        assert web not in r.stdout
        line = lines_with(r.stdout, f"✗ WorkloadIdentity {namespace}/api:")
        assert line and f"bundle {namespace}/shared-bundle does not verify certificate {api}" in line[0], r.stdout
        bundle_lines = lines_with(r.stdout, f"✗ bundle {namespace}/shared-bundle:")
        assert len(bundle_lines) == 1 and f"trust domain {tds['b']}'s CA" in bundle_lines[0], r.stdout
    finally:
        if not operator.running:
            operator.start()
        for td in tds.values():
            kube.delete_trust_domain(td)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_check_fails_for_a_ca_inside_its_rotation_window(
    kube: Kube, kube_api: client.ApiClient, cluster: Cluster, namespace: str, running_operator: OperatorProcess,
) -> None:
    name = f"rotating-{uuid.uuid4().hex[:6]}.meshtls.test"
    custom = client.CustomObjectsApi(kube_api)
    # a brought CA 30 min before its end, with a 1 h window (the API server refuses a generated CA that starts
    # inside its window: rotateBefore is at most 90 % of ca.validity)
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca(name, now - dt.timedelta(minutes=90), validity=dt.timedelta(hours=2))
    client.CoreV1Api(kube_api).create_namespaced_secret("meshtls-system", client.V1Secret(
        metadata=client.V1ObjectMeta(name=f"byo-{name}"), type="kubernetes.io/tls",
        data={"tls.crt": _b64(ca.certificate_pem()), "tls.key": _b64(ca.key_pem())}))
    kube.create_trust_domain(name, {"ca": {"secretRef": {"name": f"byo-{name}"}, "rotateBefore": "1h"},
                                    "certificates": {"minTTL": "1m", "defaultTTL": "5m", "maxTTL": "10m"}})
    try:
        wait_for(f"TrustDomain {name} Ready", lambda: is_ready(kube.trust_domain(name)), 30)
        r = meshtls(cluster, "check", "-n", namespace, "--operator-url", healthz(running_operator))
        assert r.returncode == 1, r.stdout
        failed = lines_with(r.stdout, f"✗ TrustDomain {name}:")
        assert failed and "inside its rotation window (1h before expiry)" in failed[0], r.stdout
        assert all(f"TrustDomain {name}" in line for line in lines_with(r.stdout, "✗"))
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "trustdomains", name)
        wait_for(f"TrustDomain {name} gone", lambda: _gone(custom, name), 30)
        try:
            client.CoreV1Api(kube_api).delete_namespaced_secret(f"meshtls-ca-{name}", "meshtls-system")
        except ApiException as exc:
            if exc.status != 404:
                raise
        client.CoreV1Api(kube_api).delete_namespaced_secret(f"byo-{name}", "meshtls-system")


def _gone(custom: client.CustomObjectsApi, name: str) -> bool:
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, "trustdomains", name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


@pytest.fixture(autouse=True)
def _operator_left_running(operator: OperatorProcess) -> Any:
    """Every test here leaves the session's operator running, whatever it stopped."""
    yield
    if not operator.running:
        operator.start()
