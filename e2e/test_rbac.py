"""The chart's RBAC, proven rather than assumed (issue #6).

The chart is installed for real; the operator then runs as a process with a token of the chart's ServiceAccount and
exactly the arguments the chart's StatefulSet gives it, and does the whole lifecycle: issue, rotate, revoke. The
ServiceAccount's reach is checked with `kubectl auth can-i`: no Secret outside the namespaces it serves.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess, free_port
from e2e.test_chart import (
    CHART,
    INJECTOR,
    Release,
    create_namespace,
    delete_namespace,
    ensure_chart_crds,
    helm,
    injector_slot,
    install,
    kubectl_ok,
    manifest,
    unique,
    write_values,
)
from meshtls.pki import load_certificates

pytestmark = pytest.mark.e2e


@dataclass
class Installed:
    release: Release
    workload: str  # the namespace the release serves
    other: str  # a namespace it does not serve
    trust_domain: str
    objects: list[dict[str, Any]]

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release.namespace}:{self.release.service_account}"


@pytest.fixture(scope="module")
def shared_operator_stopped(operator: OperatorProcess) -> Iterator[None]:
    """The session's admin operator (cluster-wide, URL-mode webhook) is stopped while this module runs: it would
    serve the release's namespace too, so a write could not be attributed to the ServiceAccount, and it would
    replace the release's webhook configuration at a restart. It restarts after the release is gone (and so
    writes its own webhook configuration again)."""
    was_running = operator.running
    operator.stop()
    yield
    if was_running:
        operator.start()


@pytest.fixture(scope="module")
def installed(cluster: Cluster, shared_operator_stopped: None,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    ensure_chart_crds(cluster)
    suffix = unique("rbac")
    release_ns, workload, other = f"e2e-{suffix}-ops", f"e2e-{suffix}-app", f"e2e-{suffix}-other"
    trust_domain = f"{suffix}.test"
    for ns in (release_ns, workload, other):
        create_namespace(cluster, ns, {"e2e": "true"})
    values = write_values(tmp_path_factory.mktemp("rbac") / "values.yaml", {
        "workloadNamespaces": [workload],
        "trustDomain": {"name": trust_domain, "spec": {"certificates": {"minTTL": "10s", "defaultTTL": "1h"}}},
    })
    release = Release("meshtls", release_ns, values)
    try:
        with injector_slot(cluster):
            install(cluster, release)
            yield Installed(release, workload, other, trust_domain, manifest(cluster, release.name, release_ns))
            helm(cluster, "uninstall", release.name, "-n", release_ns, "--wait", "--timeout", "60s", check=False)
    finally:
        helm(cluster, "uninstall", release.name, "-n", release_ns, "--ignore-not-found", check=False)
        for ns in (release_ns, workload, other):
            delete_namespace(cluster, ns)


def can_i(cluster: Cluster, installed: Installed, verb: str, resource: str, namespace: str | None,
          subresource: str | None = None) -> bool:
    """`kubectl auth can-i` as the ServiceAccount, with the groups the API server gives its tokens.

    namespace: a name, None for every namespace at once, CLUSTER ("") for a cluster-scoped resource."""
    ns = installed.release.namespace
    args = ["auth", "can-i", verb, resource, "--as", installed.user, "--as-group", "system:serviceaccounts",
            "--as-group", f"system:serviceaccounts:{ns}", "--as-group", "system:authenticated"]
    if namespace is None:
        args.append("--all-namespaces")
    elif namespace:
        args += ["-n", namespace]
    if subresource:
        args += ["--subresource", subresource]
    result = cluster.kubectl(*args, check=False)
    if result.returncode not in (0, 1) or result.stdout.strip() not in ("yes", "no"):
        pytest.fail(f"kubectl {' '.join(args)}: {result.stdout}{result.stderr}", pytrace=False)
    return result.returncode == 0


CLUSTER = ""  # can_i namespace for cluster-scoped resources (no -n, no --all-namespaces)


def test_service_account_reaches_only_what_it_serves(cluster: Cluster, installed: Installed) -> None:
    ops, app, other = installed.release.namespace, installed.workload, installed.other
    denied = [
        ("get", "secrets", "kube-system", None),
        ("list", "secrets", "kube-system", None),
        ("watch", "secrets", "kube-system", None),
        ("list", "secrets", None, None),  # across all namespaces
        ("get", "secrets", other, None),
        ("create", "secrets", other, None),
        ("update", "secrets", other, None),
        ("delete", "secrets", other, None),
        ("create", "secrets", "default", None),
        ("list", "secrets", ops, None),  # its own namespace: named reads and writes only
        ("create", "pods", app, "exec"),
        ("create", "pods", "kube-system", "exec"),
        ("create", "pods", app, None),
        ("get", "configmaps", "kube-system", None),
        ("create", "configmaps", other, None),
        ("patch", "configmaps", other, None),
        ("create", "mutatingwebhookconfigurations", CLUSTER, None),
        ("update", "mutatingwebhookconfigurations/some-other-webhook", CLUSTER, None),
        ("create", "validatingwebhookconfigurations", CLUSTER, None),
        ("create", "clusterrolebindings", CLUSTER, None),
        ("create", "rolebindings", app, None),
        ("impersonate", "serviceaccounts", app, None),
        ("create", "serviceaccounts", app, "token"),
        ("delete", "trustdomains.meshtls.dev", CLUSTER, None),
        ("create", "workloadidentities.meshtls.dev", app, None),
        ("patch", "workloadidentities.meshtls.dev", other, None),
    ]
    allowed = [  # positive controls: without them every "no" above could be an impersonation mistake
        ("get", "secrets", app, None),
        ("watch", "secrets", app, None),
        ("create", "secrets", app, None),
        ("delete", "secrets", app, None),
        ("get", "secrets", ops, None),
        ("update", "secrets", ops, None),
        ("update", "configmaps", app, None),
        ("patch", "configmaps", app, None),  # a bundle meshtls wrote is patched without a read first
        ("watch", "configmaps", app, None),  # sidecar ConfigMaps are restored when edited or deleted
        ("patch", "workloadidentities.meshtls.dev", app, "status"),
        ("patch", "trustdomains.meshtls.dev", CLUSTER, "status"),
        ("update", f"mutatingwebhookconfigurations/{INJECTOR}", CLUSTER, None),
        ("create", "events", app, None),
        ("create", "events", "default", None),
        ("patch", "kopfpeerings.kopf.dev", app, None),
        ("list", "namespaces", CLUSTER, None),
    ]
    wrong = [f"can {' '.join(filter(None, (v, r, s and f'({s})', n and f'in {n}')))}"
             for v, r, n, s in denied if can_i(cluster, installed, v, r, n, s)]
    wrong += [f"cannot {' '.join(filter(None, (v, r, s and f'({s})', n and f'in {n}')))}"
              for v, r, n, s in allowed if not can_i(cluster, installed, v, r, n, s)]
    assert not wrong, f"{installed.user}: " + "; ".join(wrong)


def service_account_kubeconfig(cluster: Cluster, installed: Installed, path: Path) -> Path:
    """A kubeconfig with a token of the chart's ServiceAccount: the admin's server and CA, none of its rights."""
    token = kubectl_ok(cluster, "create", "token", installed.release.service_account, "-n",
                       installed.release.namespace, "--duration=1h").strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    entry = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [entry],
        "users": [{"name": "meshtls", "user": {"token": token}}],
        "contexts": [{"name": "meshtls", "context": {"cluster": entry["name"], "user": "meshtls",
                                                     "namespace": installed.release.namespace}}],
        "current-context": "meshtls",
    }))
    return path


def chart_operator_args(installed: Installed, ordinal: int) -> tuple[list[str], dict[str, str]]:
    """The container's args and env as the kubelet would resolve them for pod <sts>-<ordinal>, with local ports."""
    sts = next(o for o in installed.objects if o["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["meshtls", "operator"]
    pod_name = f"{sts['metadata']['name']}-{ordinal}"
    fields = {"metadata.namespace": installed.release.namespace, "metadata.name": pod_name,
              "metadata.labels['apps.kubernetes.io/pod-index']": str(ordinal)}
    env = {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] if "valueFrom" in e else e["value"]
           for e in container.get("env", [])}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    # OperatorProcess gives the metrics and health ports (free ones); the webhook gets a free one too.
    args = [a for a in args if not a.startswith(("--metrics-port=", "--health-port="))]
    args = [f"--webhook-port={free_port()}" if a.startswith("--webhook-port=") else a for a in args]
    # "--opt=value" as "--opt value" (the same to argparse): OperatorProcess looks for a bare -n/--namespace.
    return [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])], env


def leaf_serial(data: dict[str, bytes]) -> str:
    return format(load_certificates(data["tls.crt"])[0].serial_number, "x")


def test_operator_with_the_chart_service_account_issues_rotates_and_revokes(
    cluster: Cluster, installed: Installed, kube: Kube, tmp_path: Path,
) -> None:
    args, env = chart_operator_args(installed, ordinal=1)
    assert " ".join(args).count("--namespace ") == 1 and f"--namespace {installed.workload}" in " ".join(args), args
    assert "--priority 1" in " ".join(args), args
    instance = f"{env['POD_ID']}-rbac-e2e"
    proc = OperatorProcess(service_account_kubeconfig(cluster, installed, tmp_path / "sa.kubeconfig"), tmp_path,
                           name="operator-sa", extra_args=args, env={**env, "HOSTNAME": instance})
    ns = installed.workload
    try:
        started = time.monotonic()
        proc.start()
        healthy = time.monotonic() - started
        wait_for("the chart's TrustDomain to be Ready", lambda: is_ready(kube.trust_domain(installed.trust_domain)),
                 30)
        # kopf holds the peering: it announced itself with the priority the pod-index label gave it.
        peering = kube.custom.get_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", "meshtls")
        assert peering["status"][env["POD_ID"]]["priority"] == 1, peering

        # Issued: Secret, bundle, Ready status, Event, all by the ServiceAccount's operator.
        start = time.monotonic()
        kube.create_identity(ns, "api", {"serviceAccountName": "api", "trustDomain": installed.trust_domain,
                                         "ttl": "20s"})
        data = wait_for("the Secret api-mtls", lambda: kube.secret_data(ns, "api-mtls"), 10)
        issued_in = time.monotonic() - start
        body = wait_for("Ready status", lambda: (b := kube.identity(ns, "api")) and is_ready(b) and b, 10)
        assert body["status"]["serialNumber"] == leaf_serial(data)
        bundle = wait_for("the trust bundle", lambda: kube.configmap_data(ns, "meshtls-bundle"), 5)
        ca_pem = bundle["ca.crt"].encode()
        state = kube.secret_data(installed.release.namespace, f"meshtls-ca-{installed.trust_domain}")
        assert state is not None and state["ca.crt"] in ca_pem, "the CA is not the one in the release's namespace"
        issued = wait_for("an Issued Event", lambda: kube.events(ns, reason="Issued", name="api"), 5)
        assert issued[0].reporting_instance == instance, issued[0]

        # Rotates with a 20 s TTL (renewal at 2/3 of the lifetime): two rotations.
        serials = [leaf_serial(data)]

        def rotated_twice() -> bool:
            d = kube.secret_data(ns, "api-mtls")
            if d and leaf_serial(d) != serials[-1]:
                serials.append(leaf_serial(d))
            return len(serials) >= 3

        wait_for("two rotations", rotated_twice, 45, interval=0.2)
        rotations = wait_for("Rotated Events", lambda: (e := kube.events(ns, reason="Rotated", name="api"))
                             and len(e) >= 2 and e, 5)
        assert {e.reporting_instance for e in rotations} == {instance}

        # Deleted: the serial is on the re-signed CRL in the bundle, the Secret is gone.
        last = int(serials[-1], 16)
        kube.delete_identity(ns, "api")

        def revoked() -> bool:
            crl = x509.load_pem_x509_crl((kube.configmap_data(ns, "meshtls-bundle") or {})["crl.pem"].encode())
            return crl.get_revoked_certificate_by_serial_number(last) is not None

        wait_for("the last serial on the bundle's CRL", revoked, 10)
        wait_for("the Secret to be deleted", lambda: kube.secret_data(ns, "api-mtls") is None, 10)
        wait_for("the identity to be gone", lambda: kube.identity(ns, "api") is None, 10)
        revoked_events = wait_for("a Revoked Event", lambda: kube.events(ns, reason="Revoked", name="api"), 5)
        assert revoked_events[0].reporting_instance == instance

        # The webhook: the operator filled in the chart's configuration's caBundle (get+update only, no create).
        live = client.AdmissionregistrationV1Api(kube.api).read_mutating_webhook_configuration(INJECTOR)
        tls = kube.secret_data(installed.release.namespace, "meshtls-webhook-tls")
        assert tls is not None
        for webhook in live.webhooks:
            assert base64.b64decode(webhook.client_config.ca_bundle) == tls["ca.crt"]
            assert webhook.client_config.service.name == f"{installed.release.fullname}-webhook"
        # ... and a `helm upgrade` keeps it: Helm's three-way merge leaves a field it never set alone.
        helm(cluster, "upgrade", installed.release.name, str(CHART), "-n", installed.release.namespace,
             "--reuse-values", "--set", "webhook.failurePolicy=Fail", "--wait", "--timeout", "60s")
        upgraded = client.AdmissionregistrationV1Api(kube.api).read_mutating_webhook_configuration(INJECTOR)
        for webhook in upgraded.webhooks:
            # the identity finalizer's rule is always Ignore: a down operator never blocks creating an identity
            identities = webhook.rules[0].resources == ["workloadidentities"]
            assert webhook.failure_policy == ("Ignore" if identities else "Fail"), webhook.name
            assert base64.b64decode(webhook.client_config.ca_bundle) == tls["ca.crt"]
        assert sum(w.rules[0].resources == ["workloadidentities"] for w in upgraded.webhooks) == 1

        log = proc.log_path.read_text(errors="replace")
        denied = [line for line in log.splitlines() if re.search(r"\b403\b|[Ff]orbidden", line)]
        assert not denied, "the operator was denied something:\n" + "\n".join(denied[:10])
        print(f"as {installed.user}: healthy in {healthy:.1f} s, issued in {issued_in:.2f} s, "
              f"{len(serials) - 1} rotations, revoked at {dt.datetime.now(dt.UTC):%H:%M:%S}")
    finally:
        proc.stop()
