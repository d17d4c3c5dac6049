"""`meshtls ca rotate | status` on the real control plane with the operator running (issue 13, item 13): the console
script in a subprocess, as a user runs it."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import GROUP, Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess
from e2e.test_cli import BIN, meshtls
from meshtls.pki import generate_ca

ANNOTATION = "meshtls.dev/rotate-ca"
SHORT_TTLS = {"minTTL": "10s", "defaultTTL": "20s", "maxTTL": "30s"}


@pytest.fixture
def trust_domains(kube: Kube, kube_api: client.ApiClient) -> Iterator[list[str]]:
    """TrustDomains the test creates, deleted afterwards with their CA state Secrets."""
    created: list[str] = []
    yield created
    for name in created:
        kube.delete_trust_domain(name)


def ready_trust_domain(kube: Kube, created: list[str], spec: dict[str, Any]) -> str:
    name = f"cli-{uuid.uuid4().hex[:6]}.meshtls.test"
    kube.create_trust_domain(name, spec)
    created.append(name)
    wait_for(f"TrustDomain {name} Ready", lambda: is_ready(kube.trust_domain(name)), 30)
    return name


def status_json(cluster: Cluster, name: str) -> dict[str, Any]:
    r = meshtls(cluster, "ca", "status", name, "-o", "json")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip()


def test_rotate_wait_follows_preparing_to_rotating_and_status_shows_each_phase(
    kube: Kube, cluster: Cluster, running_operator: OperatorProcess, trust_domains: list[str],
) -> None:
    name = ready_trust_domain(kube, trust_domains, {"ca": {"propagationDelay": "15s"}, "certificates": SHORT_TTLS})
    before = status_json(cluster, name)
    old = before["caFingerprint"]
    assert before["phase"] == "Stable" and before["ready"] == "True" and before["source"] == "generated"
    table = meshtls(cluster, "ca", "status")
    assert table.returncode == 0, table.stderr
    assert "NAME" in table.stdout.splitlines()[0] and "PHASE" in table.stdout.splitlines()[0]
    assert [line for line in table.stdout.splitlines() if line.startswith(f"{name} ") and f"sha256:{old[:12]}" in line
            and "Stable" in line], table.stdout

    exe = shutil.which("meshtls", path=str(BIN))
    assert exe is not None
    started = time.monotonic()
    follower = subprocess.Popen([exe, "ca", "rotate", name, "--wait", "--timeout", "90s"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**cluster.env(), "NO_COLOR": "1"})
    try:
        # while it waits, `ca status` shows Preparing: the next CA in the bundles, not signing yet
        preparing = wait_for("ca status to show Preparing", lambda: (s := status_json(cluster, name))["phase"]
                             == "Preparing" and s, 20, interval=0.5)
        assert preparing["caFingerprint"] == old and preparing["nextFingerprint"] not in (None, old)
        assert preparing["since"] and preparing["lastRequest"] == kube.trust_domain(name)["metadata"][
            "annotations"][ANNOTATION]
        # a second request now is refused and writes nothing: the operator would serve it only after this one
        again = meshtls(cluster, "ca", "rotate", name)
        assert "is already rotating: phase Preparing" in one_line_error(again)
        assert kube.trust_domain(name)["metadata"]["annotations"][ANNOTATION] == preparing["lastRequest"]
        out, err = follower.communicate(timeout=90)
    finally:
        if follower.poll() is None:
            follower.kill()
    seconds = time.monotonic() - started
    assert follower.returncode == 0, out + err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["Requested", "Preparing", "Rotating"], out
    assert f"signing switched to CA sha256:{preparing['nextFingerprint'][:12]}" in lines[2]
    # each phase line starts with when the operator entered it; the switch comes one propagation delay later
    stamps = [line.split()[0] for line in lines]
    assert stamps[1] == preparing["since"]
    after = status_json(cluster, name)
    assert after["phase"] == "Rotating" and after["since"] == stamps[2]
    assert after["caFingerprint"] == preparing["nextFingerprint"] and after["previousFingerprint"] == old
    assert after["retireAfter"] and after["lastRequest"] == preparing["lastRequest"]
    # while the old CA retires, another rotation is refused with when it can start
    retiring = meshtls(cluster, "ca", "rotate", name)
    assert "still retiring the old CA" in one_line_error(retiring) and after["retireAfter"] in retiring.stderr
    print(f"ca rotate --wait: Preparing -> Rotating in {seconds:.1f} s (propagationDelay 15s)")


def test_rotate_json_without_wait_and_the_request_id_is_fresh_each_time(
    kube: Kube, cluster: Cluster, running_operator: OperatorProcess, trust_domains: list[str],
) -> None:
    name = ready_trust_domain(kube, trust_domains, {"ca": {"propagationDelay": "1s"}, "certificates": SHORT_TTLS})
    r = meshtls(cluster, "ca", "rotate", name, "-o", "json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert kube.trust_domain(name)["metadata"]["annotations"][ANNOTATION] == first["request"]
    wait_for("the rotation to switch", lambda: status_json(cluster, name)["phase"] == "Rotating", 30, interval=0.5)
    assert status_json(cluster, name)["lastRequest"] == first["request"]
    yaml_out = yaml.safe_load(meshtls(cluster, "ca", "status", name, "-o", "yaml").stdout)
    assert yaml_out["phase"] == "Rotating" and {c["type"] for c in yaml_out["conditions"]} >= {"Ready"}


def test_errors_are_one_line_and_exit_non_zero(
    kube: Kube, kube_api: client.ApiClient, cluster: Cluster, namespace: str, running_operator: OperatorProcess,
    trust_domains: list[str], reader_kubeconfig: Path,
) -> None:
    name = ready_trust_domain(kube, trust_domains, {})
    # an unknown name: the available ones are named
    for verb in ("rotate", "status"):
        err = one_line_error(meshtls(cluster, "ca", verb, "nope.meshtls.test"))
        assert err.startswith("meshtls: TrustDomain 'nope.meshtls.test' not found; the cluster has: ") and name in err

    # a brought CA: rotated by replacing its Secret, and nothing is written
    core = client.CoreV1Api(kube_api)
    td = f"cli-brought-{uuid.uuid4().hex[:6]}.meshtls.test"
    brought = generate_ca(td, dt.datetime.now(dt.UTC))
    secret = f"cli-brought-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_secret("meshtls-system", {
        "metadata": {"name": secret}, "type": "kubernetes.io/tls",
        "data": {"tls.crt": base64.b64encode(brought.certificate_pem()).decode(),
                 "tls.key": base64.b64encode(brought.key_pem()).decode()}})
    try:
        kube.create_trust_domain(td, {"ca": {"secretRef": {"name": secret}}})
        trust_domains.append(td)
        err = one_line_error(meshtls(cluster, "ca", "rotate", td, "--wait"))
        assert f"brings its own CA (spec.ca.secretRef: Secret {secret}" in err and "replacing that Secret" in err
        assert ANNOTATION not in (kube.trust_domain(td)["metadata"].get("annotations") or {})
        assert status_json(cluster, td)["source"] == f"secretRef {secret}"
    finally:
        core.delete_namespaced_secret(secret, "meshtls-system")

    # no permission: a ServiceAccount that may read TrustDomains but not patch them
    kubeconfig = reader_kubeconfig
    assert meshtls(cluster, "ca", "status", name, "--kubeconfig", str(kubeconfig)).returncode == 0
    err = one_line_error(meshtls(cluster, "ca", "rotate", name, "--kubeconfig", str(kubeconfig)))
    assert err.startswith(f"meshtls: no permission to patch TrustDomain {name}") and "forbidden" in err
    assert ANNOTATION not in (kube.trust_domain(name)["metadata"].get("annotations") or {})


def test_rotate_wait_times_out_when_the_operator_is_down(
    kube: Kube, cluster: Cluster, operator: OperatorProcess, trust_domains: list[str],
) -> None:
    if not operator.running:
        operator.start()
    name = ready_trust_domain(kube, trust_domains, {"ca": {"propagationDelay": "1s"}})
    operator.stop()
    try:
        started = time.monotonic()
        r = meshtls(cluster, "ca", "rotate", name, "--wait", "--timeout", "3s")
        err = one_line_error(r)
        assert time.monotonic() - started < 30
        assert err == (f"meshtls: timed out after 3 s waiting for the operator to take the request (TrustDomain "
                       f"{name}, phase Requested); is the operator running? (meshtls check)")
        assert r.stdout.splitlines()[0].split()[1] == "Requested"
    finally:
        operator.start()
    # the request stays: the restarted operator serves it
    wait_for("the restarted operator to take the request", lambda: status_json(cluster, name)["phase"]
             in ("Preparing", "Rotating"), 30, interval=0.5)


@pytest.fixture
def reader_kubeconfig(cluster: Cluster, kube_api: client.ApiClient, namespace: str,
                      tmp_path: Path) -> Iterator[Path]:
    """A kubeconfig for a ServiceAccount bound to get/list on TrustDomains only."""
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    sa = "cli-reader"
    core.create_namespaced_service_account(namespace, {"metadata": {"name": sa}})
    role = f"{namespace}-td-reader"
    rbac.create_cluster_role({"metadata": {"name": role, "labels": {"e2e": "true"}}, "rules": [
        {"apiGroups": [GROUP], "resources": ["trustdomains"], "verbs": ["get", "list"]}]})
    rbac.create_cluster_role_binding({"metadata": {"name": role, "labels": {"e2e": "true"}},
                                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                  "name": role},
                                      "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]})
    try:
        token = core.create_namespaced_service_account_token(
            sa, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=[], expiration_seconds=3600)))
        assert token.status is not None
        admin = yaml.safe_load(cluster.kubeconfig.read_text())
        context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
        entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
        path = tmp_path / "reader.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "clusters": [entry],
            "users": [{"name": sa, "user": {"token": token.status.token}}],
            "contexts": [{"name": sa, "context": {"cluster": entry["name"], "user": sa, "namespace": namespace}}],
            "current-context": sa,
        }))
        # the authorizer learns of a new binding from its informer: wait until it is in effect
        wait_for("the reader's binding", lambda: meshtls(cluster, "ca", "status", "--kubeconfig", str(path))
                 .returncode == 0, 15, interval=0.5)
        yield path
    finally:
        rbac.delete_cluster_role_binding(role)
        rbac.delete_cluster_role(role)


@pytest.fixture(autouse=True)
def _operator_left_running(operator: OperatorProcess) -> Any:
    yield
    if not operator.running:
        operator.start()
