"""Isolation (issue #8): an identity never leaves its namespace, a pod never gets another ServiceAccount's identity,
the operator never writes a Secret it does not own, and private keys never reach a log or an Event.

The key-leak audit runs twice: in its test, and again when the session ends (a session fixture's finalizer), so
that it also covers every log and Event the suites after this module produce.
"""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, ready_condition, wait_for
from e2e.operator_process import OperatorProcess, free_port
from meshtls.pki import load_certificates

MANAGED = "app.kubernetes.io/managed-by=meshtls"
# a private key in PEM, and the base64 of a PEM key header as it sits in a Secret's data (PKCS#8, SEC1, PKCS#1)
LEAK_MARKERS = ("PRIVATE KEY", "LS0tLS1CRUdJTiBQUklWQVRF", "LS0tLS1CRUdJTiBFQyBQUklW",
                "LS0tLS1CRUdJTiBSU0EgUFJJVkFURS")
SPIFFE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def foreign_identities(kube: Kube) -> tuple[int, list[str]]:
    """Every meshtls workload Secret in the cluster: (how many, those whose URI SAN names another namespace)."""
    wrong, count = [], 0
    for s in kube.core.list_secret_for_all_namespaces(label_selector=f"{MANAGED},meshtls.dev/identity").items:
        crt = (s.data or {}).get("tls.crt")
        if not crt or not any(o.kind == "WorkloadIdentity" for o in s.metadata.owner_references or []):
            continue  # only what the operator wrote (a decoy with meshtls's labels is someone else's)
        count += 1
        leaf = load_certificates(base64.b64decode(crt))[0]
        uris = uri_sans(leaf)
        m = SPIFFE.match(uris[0]) if len(uris) == 1 else None
        if m is None or m.group(2) != s.metadata.namespace:
            wrong.append(f"{s.metadata.namespace}/{s.metadata.name}: {uris}")
    return count, wrong


def leaks_in_files(roots: list[Path], patterns: tuple[str, ...] = ("*.log",)) -> tuple[int, list[str]]:
    """(files read, "file: marker" for each file containing a key marker). Key files themselves are not logs."""
    read, found = 0, []
    seen: set[Path] = set()
    for root in roots:
        if not root.exists():
            continue
        for pattern in patterns:
            for path in root.rglob(pattern):
                if path in seen or not path.is_file():
                    continue
                seen.add(path)
                read += 1
                text = path.read_bytes().decode(errors="replace")
                found += [f"{path}: {m}" for m in LEAK_MARKERS if m in text]
    return read, found


def leaks_in_events(kube: Kube) -> tuple[int, list[str]]:
    events = kube.core.list_event_for_all_namespaces().items
    found = [f"Event {e.metadata.namespace}/{e.metadata.name} ({e.reason}): {m}" for e in events
             for m in LEAK_MARKERS if m in (e.message or "")]
    return len(events), found


def audit(cluster: Cluster, kube: Kube, operator: OperatorProcess, tmp_root: Path) -> dict[str, Any]:
    """Grep every log this run can reach, and every Event in the cluster, for private key material."""
    log_roots = [operator.log_path.parent, Path(cluster.logs_dir), tmp_root]
    files, file_leaks = leaks_in_files(log_roots)
    events, event_leaks = leaks_in_events(kube)
    secrets, wrong_ns = foreign_identities(kube)
    return {"files": files, "events": events, "secrets": secrets, "leaks": file_leaks + event_leaks,
            "wrong_namespace": wrong_ns}


@pytest.fixture(scope="session")
def late_key_audit(cluster: Cluster, kube: Kube, operator: OperatorProcess,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the very end of the session, after every other suite: the same audit over everything they left."""
    yield
    result = audit(cluster, kube, operator, tmp_path_factory.getbasetemp())
    print(f"\nfigures: end-of-session key audit: {result['files']} log files, {result['events']} Events, "
          f"{result['secrets']} workload Secrets; {len(result['leaks'])} key leaks, "
          f"{len(result['wrong_namespace'])} identities outside their namespace")
    assert not result["leaks"], result["leaks"][:10]
    assert not result["wrong_namespace"], result["wrong_namespace"][:10]


# --- an identity never leaves its namespace ----------------------------------------------------------------------


def test_an_identity_is_always_in_its_own_namespace(
    cluster: Cluster, kube: Kube, trust_domain: str, running_operator: OperatorProcess, namespace: str,
) -> None:
    other = f"e2e-isolation-other-{uuid.uuid4().hex[:6]}"
    smuggled = ["../other", f"../{other}", f"x/ns/{other}", f"x/../../ns/{other}/sa/admin", f"web/ns/{other}",
                "%2e%2e", "web%2Fns%2Fother", "web\\ns\\other"]
    for i, sa in enumerate(smuggled):
        text = (f"apiVersion: meshtls.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: smuggle-{i}}}\n"
                f"spec: {{serviceAccountName: {sa!r}, trustDomain: {trust_domain}}}\n")
        result = cluster.kubectl("create", "-n", namespace, "-f", "-", input=text, check=False)
        assert result.returncode != 0, f"{sa!r} was accepted"
        assert "spec.serviceAccountName" in result.stderr, result.stderr
    # names that are valid and look like paths or other namespaces stay in this namespace
    tricky = {"ns-other": "ns.other", "sa-admin": "sa.admin", "dots": f"{other}.svc.cluster.local",
              "plain": "web"}
    for name, sa in tricky.items():
        kube.create_identity(namespace, name, {"serviceAccountName": sa, "trustDomain": trust_domain})
    for name, sa in tricky.items():
        wait_for(f"{name} Ready", lambda n=name: is_ready(kube.identity(namespace, n)), 20)
        data = kube.secret_data(namespace, f"{name}-mtls")
        assert data is not None
        assert uri_sans(load_certificates(data["tls.crt"])[0]) == [f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"]
        assert kube.identity(namespace, name)["status"]["spiffeID"] == (  # type: ignore[index]
            f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
    count, wrong = foreign_identities(kube)
    print(f"\nfigures: {len(smuggled)} namespace-smuggling ServiceAccount names refused; {count} workload "
          f"certificates in the cluster, {len(wrong)} outside their namespace")
    assert not wrong, wrong[:10]


# --- a pod never gets another ServiceAccount's identity ----------------------------------------------------------


def test_a_pod_of_another_service_account_gets_no_sidecar_but_a_warning_and_an_event(
    cluster: Cluster, kube: Kube, kube_api: client.ApiClient, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    core = client.CoreV1Api(kube_api)
    ns = f"e2e-isolation-inject-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=ns, labels={"meshtls.dev/inject": "enabled", "e2e": "true"})))
    try:
        for sa in ("web", "other"):
            core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa)))
        kube.create_identity(ns, "web", {"serviceAccountName": "web", "trustDomain": trust_domain,
                                         "inbound": [{"port": free_port(), "appPort": free_port()}]})
        wait_for("web Ready", lambda: is_ready(kube.identity(ns, "web")), 20)
        wait_for("web's sidecar config", lambda: kube.configmap_data(ns, "web-meshtls-proxy"), 10)

        def pod(name: str, sa: str) -> str:
            return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n"
                    f"spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: example/app}}]}}\n")

        # the control: the right ServiceAccount is injected
        def containers_of(name: str) -> list[str]:
            spec = core.read_namespaced_pod(name, ns).spec
            return [c.name for c in (spec.init_containers or []) + spec.containers]

        web = cluster.kubectl("create", "-n", ns, "-f", "-", input=pod("web", "web"))
        assert "meshtls-proxy" in containers_of("web"), web.stderr
        # the impostor: same labels, same namespace, another ServiceAccount
        impostor = cluster.kubectl("create", "-n", ns, "-f", "-", input=pod("impostor", "other"))
        created = core.read_namespaced_pod("impostor", ns)
        containers = containers_of("impostor")
        volumes = [v.secret.secret_name for v in created.spec.volumes or [] if v.secret is not None]
        assert containers == ["app"], containers
        assert "web-mtls" not in volumes, volumes
        assert "meshtls.dev/injected-identity" not in (created.metadata.annotations or {})
        assert "Warning:" in impostor.stderr and "ServiceAccount other" in impostor.stderr, impostor.stderr
        events = wait_for("an IdentityNotFound Event for the impostor", lambda: [
            e for e in core.list_namespaced_event(ns, field_selector="reason=IdentityNotFound").items
            if e.involved_object.name == "impostor"], 10)
        assert events[0].type == "Warning" and "other" in events[0].message
        warning = next(line for line in impostor.stderr.splitlines() if line.startswith("Warning:"))
        print(f"\nfigures: impostor pod admitted without a sidecar; kubectl printed {warning!r}; "
              f"Event {events[0].reason}")
    finally:
        core.delete_namespace(ns, propagation_policy="Background")


# --- the operator never writes a Secret it does not own ----------------------------------------------------------


def _snapshot(secret: client.V1Secret) -> tuple[Any, ...]:
    m = secret.metadata
    return (secret.type, secret.data, m.labels, m.annotations,
            [(o.kind, o.name, o.uid) for o in m.owner_references or []], m.resource_version)


def test_a_meshtls_labelled_secret_of_another_owner_is_untouched_byte_for_byte(
    kube: Kube, kube_api: client.ApiClient, trust_domain: str, running_operator: OperatorProcess, namespace: str,
) -> None:
    core = client.CoreV1Api(kube_api)
    # a real object owns it (the garbage collector would delete a Secret whose owner does not exist)
    owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="decoy-owner"), data={"x": "y"}))
    core.create_namespaced_secret(namespace, client.V1Secret(
        type="kubernetes.io/tls",
        metadata=client.V1ObjectMeta(
            name="web-mtls",
            labels={"app.kubernetes.io/managed-by": "meshtls", "meshtls.dev/identity": "web"},
            annotations={"meshtls.dev/owner-uid": owner.metadata.uid, "meshtls.dev/serial": "1234"},
            owner_references=[client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="decoy-owner",
                                                      uid=owner.metadata.uid)]),
        string_data={"tls.crt": "not a certificate", "tls.key": "not a key", "ca.crt": "not a CA"}))
    before = _snapshot(core.read_namespaced_secret("web-mtls", namespace))
    kube.create_identity(namespace, "web", {"serviceAccountName": "web", "trustDomain": trust_domain})
    cond = wait_for("SecretConflict", lambda: (c := ready_condition(kube.identity(namespace, "web")))
                    .get("reason") == "SecretConflict" and c, 10)
    assert cond["status"] == "False"
    # tampering with it (as if it were ours) must not make the operator "repair" it either
    core.patch_namespaced_secret("web-mtls", namespace, {"stringData": {"tls.key": "still not a key"}})
    tampered = _snapshot(core.read_namespaced_secret("web-mtls", namespace))
    time.sleep(3)  # the operator watches Secrets with its labels: this change reaches it, and it must hold back
    assert _snapshot(core.read_namespaced_secret("web-mtls", namespace)) == tampered, "the operator wrote it"
    kube.delete_identity(namespace, "web")
    wait_for("the identity to be gone", lambda: kube.identity(namespace, "web") is None, 15)
    after = _snapshot(core.read_namespaced_secret("web-mtls", namespace))
    assert after == tampered, "deleting the identity touched a Secret it did not own"
    # between the first look and the end, the test's own write (tls.key) is the only change
    assert before[0] == tampered[0] and before[2:5] == tampered[2:5]
    assert {k: v for k, v in before[1].items() if k != "tls.key"} == {k: v for k, v in tampered[1].items()
                                                                      if k != "tls.key"}
    revoked = kube.events(namespace, reason="Revoked", name="web")
    assert revoked and "left (not ours)" in revoked[0].message, [e.message for e in revoked]


# --- private keys never reach a log or an Event ------------------------------------------------------------------


def test_private_keys_never_appear_in_logs_or_events(
    cluster: Cluster, kube: Kube, trust_domain: str, running_operator: OperatorProcess, namespace: str,
    tmp_path_factory: pytest.TempPathFactory, late_key_audit: None,
) -> None:
    # make sure there is something to leak: a few identities, a rotation, a revocation and a tampered Secret
    for name, ttl in (("k1", "20s"), ("k2", "1h"), ("k3", "1h")):
        kube.create_identity(namespace, name, {"serviceAccountName": name, "trustDomain": trust_domain, "ttl": ttl})
    for name in ("k1", "k2", "k3"):
        wait_for(f"{name} Ready", lambda n=name: is_ready(kube.identity(namespace, n)), 20)
    kube.core.patch_namespaced_secret("k2-mtls", namespace, {"stringData": {"tls.key": "garbage"}})
    kube.patch_identity(namespace, "k3", {"metadata": {"annotations": {"meshtls.dev/revoke": "keyCompromise"}}})
    kube.delete_identity(namespace, "k1")
    wait_for("k1 revoked", lambda: kube.events(namespace, reason="Revoked", name="k1"), 15)
    wait_for("k2 repaired", lambda: kube.events(namespace, reason="Repaired", name="k2"), 15)
    result = audit(cluster, kube, running_operator, tmp_path_factory.getbasetemp())
    print(f"\nfigures: key audit now: {result['files']} log files, {result['events']} Events, {result['secrets']} "
          f"workload Secrets; {len(result['leaks'])} key leaks; the same audit runs again at the end of the session")
    assert result["files"] >= 2, "no logs found to audit"
    assert not result["leaks"], result["leaks"][:10]
    assert not result["wrong_namespace"], result["wrong_namespace"][:10]
    # and the audit itself finds a key where there is one
    canary = tmp_path_factory.mktemp("canary") / "canary.log"
    canary.write_text("oops: " + base64.b64encode(kube.secret_data(namespace, "k2-mtls")["tls.key"]).decode())  # type: ignore[index]
    try:
        assert leaks_in_files([canary.parent])[1], "the audit does not see a leaked key"
    finally:
        os.remove(canary)
