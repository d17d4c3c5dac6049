"""The Helm chart on the real control plane (issue #6): lint, server-side validation, install creates every object,
uninstall removes them and keeps the CRDs.

The helpers here (helm, render, install, the injector slot) are shared with test_rbac.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import PushedImage
from e2e.harness import Cluster
from e2e.registry import skopeo_inspect

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "meshtls"
INJECTOR = "meshtls-injector"  # fixed by the operator (webhook.py CONFIGURATION_NAME): one installation per cluster
CHART_CRDS = ("trustdomains.meshtls.dev", "workloadidentities.meshtls.dev", "clusterkopfpeerings.kopf.dev",
              "kopfpeerings.kopf.dev")

# Stand-ins for the Prometheus operator's CRDs (not shipped here), so that the chart's ServiceMonitor and
# PrometheusRule are installed and removed for real; their schema is not the upstream one.
MONITORING_CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule, listKind: PrometheusRuleList}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


# --- helpers (also used by test_rbac.py) -----------------------------------------------------------------------


def helm(cluster: Cluster, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Runs the cached helm (v3.16) against the cluster; fails the test with helm's output when it fails."""
    try:
        exe = cluster.bin("helm")
    except Exception as exc:  # a build failure: say so, never skip
        pytest.fail(f"helm is needed by the chart tests and could not be built ({exc}); "
                    "run `make cluster-build` (it builds helm into ~/.cache/meshtls/bin)", pytrace=False)
    if not exe.is_file():
        pytest.fail(f"helm is needed by the chart tests: {exe} is missing; run `make cluster-build`", pytrace=False)
    result = subprocess.run([str(exe), "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True,
                            text=True, timeout=timeout, env=cluster.env())
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}",
                    pytrace=False)
    return result


def kubectl_ok(cluster: Cluster, *args: str, input: str | None = None) -> str:
    result = cluster.kubectl(*args, input=input, check=False)
    if result.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
    return result.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def fullname(release: str) -> str:
    """The chart's meshtls.fullname."""
    return release if "meshtls" in release else f"{release}-meshtls"


def write_values(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def render(cluster: Cluster, release: str, namespace: str, values: Path, *extra: str) -> list[dict[str, Any]]:
    out = helm(cluster, "template", release, str(CHART), "-n", namespace, "-f", str(values), *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def manifest(cluster: Cluster, release: str, namespace: str) -> list[dict[str, Any]]:
    out = helm(cluster, "get", "manifest", release, "-n", namespace).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def ensure_chart_crds(cluster: Cluster) -> None:
    """The chart's crds/ (meshtls's, byte-identical to crds/, and kopf's peering CRDs), as Helm installs them."""
    kubectl_ok(cluster, "apply", "-f", str(CHART / "crds"))
    kubectl_ok(cluster, "apply", "-f", "-", input=MONITORING_CRDS)
    kubectl_ok(cluster, "wait", "--for=condition=Established", "--timeout=60s",
               *(f"crd/{c}" for c in (*CHART_CRDS, "servicemonitors.monitoring.coreos.com",
                                      "prometheusrules.monitoring.coreos.com")))


@contextlib.contextmanager
def injector_slot(cluster: Cluster) -> Iterator[None]:
    """The MutatingWebhookConfiguration's name is cluster-wide and fixed. An operator started by another suite
    (URL mode) may have left one behind: set it aside while a release owns the name, then put it back."""
    got = cluster.kubectl("get", "mutatingwebhookconfiguration", INJECTOR, "-o", "json", check=False)
    saved: dict[str, Any] | None = None
    if got.returncode == 0:
        saved = json.loads(got.stdout)
        owner = (saved["metadata"].get("annotations") or {}).get("meta.helm.sh/release-name")
        if owner:
            pytest.fail(f"MutatingWebhookConfiguration {INJECTOR} belongs to Helm release {owner!r}: "
                        "uninstall it first (one meshtls installation per cluster)", pytrace=False)
        kubectl_ok(cluster, "delete", "mutatingwebhookconfiguration", INJECTOR)
    try:
        yield
    finally:
        if saved is not None:
            for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
                saved["metadata"].pop(key, None)
            cluster.kubectl("delete", "mutatingwebhookconfiguration", INJECTOR, "--ignore-not-found", check=False)
            cluster.kubectl("create", "-f", "-", input=json.dumps(saved), check=False)


def create_namespace(cluster: Cluster, name: str, labels: dict[str, str] | None = None) -> None:
    kubectl_ok(cluster, "create", "namespace", name)
    if labels:
        kubectl_ok(cluster, "label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()))


def delete_namespace(cluster: Cluster, name: str) -> None:
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@dataclass
class Release:
    name: str
    namespace: str
    values: Path

    @property
    def fullname(self) -> str:
        return fullname(self.name)

    @property
    def service_account(self) -> str:
        return self.fullname


def install(cluster: Cluster, release: Release, *extra: str) -> float:
    start = time.monotonic()
    helm(cluster, "install", release.name, str(CHART), "-n", release.namespace, "-f", str(release.values),
         "--wait", "--timeout", "120s", *extra)
    return time.monotonic() - start


def exists(cluster: Cluster, obj: dict[str, Any]) -> bool:
    ns = obj["metadata"].get("namespace")
    args = ["get", f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}" if "/" in obj["apiVersion"] else obj["kind"],
            obj["metadata"]["name"], "-o", "name", *(["-n", ns] if ns else [])]
    result = cluster.kubectl(*args, check=False)
    if result.returncode == 0:
        return True
    if "NotFound" in result.stderr or "not found" in result.stderr:
        return False
    pytest.fail(f"kubectl {' '.join(args)}: {result.stderr}", pytrace=False)


def describe(obj: dict[str, Any]) -> str:
    ns = obj["metadata"].get("namespace")
    return f"{obj['kind']} {ns + '/' if ns else ''}{obj['metadata']['name']}"


# --- tests -----------------------------------------------------------------------------------------------------


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-wide, monitoring, Fail": {
        "clusterWide": True, "webhook": {"failurePolicy": "Fail"},
        "metrics": {"serviceMonitor": {"enabled": True}}, "prometheusRule": {"enabled": True},
        "trustDomain": {"name": "example.org", "keep": True, "spec": {"certificates": {"defaultTTL": "30m"}}},
    },
    "minimal": {
        "replicas": 1, "webhook": {"enabled": False}, "metrics": {"enabled": False},
        "podDisruptionBudget": {"enabled": False}, "trustDomain": {"create": False}, "extraArgs": ["--verbose"],
    },
}


def test_helm_lint(cluster: Cluster, tmp_path: Path) -> None:
    result = helm(cluster, "lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout
    for name, values in VARIANTS.items():
        result = helm(cluster, "lint", "--strict", str(CHART), "-f",
                      str(write_values(tmp_path / "values.yaml", values)), check=False)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    # Namespaced mode with no namespace is refused with a reason, not rendered into a cluster-wide operator.
    result = helm(cluster, "template", "x", str(CHART), "--set", "workloadNamespaces=null", check=False)
    assert result.returncode != 0 and "workloadNamespaces is empty" in result.stderr, result.stderr


def test_rendered_manifests_pass_server_side_dry_run(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    ensure_chart_crds(cluster)
    for name, values in VARIANTS.items():
        values = {"workloadNamespaces": [namespace], **values}
        out = helm(cluster, "template", "dry", str(CHART), "-n", namespace, "-f",
                   str(write_values(tmp_path / "values.yaml", values))).stdout
        with injector_slot(cluster):  # as on a fresh cluster: a create, not a patch of another configuration
            applied = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=out, check=False)
        assert applied.returncode == 0, f"{name}: {applied.stdout}\n{applied.stderr}"
        kinds = {line.split("/")[0].split(".")[0] for line in applied.stdout.splitlines()}
        assert {"serviceaccount", "clusterrole", "statefulset"} <= kinds, applied.stdout


def test_install_creates_every_object_and_uninstall_removes_them(
    cluster: Cluster, namespace: str, tmp_path: Path, pushed_image: PushedImage,
) -> None:
    """Installed from the image `make image` built and the session pushed to a loopback registry."""
    ensure_chart_crds(cluster)
    release_ns = unique("e2e-chart")
    trust_domain = f"{unique('chart')}.test"
    create_namespace(cluster, release_ns, {"pod-security.kubernetes.io/enforce": "restricted"})
    release = Release("meshtls", release_ns, write_values(tmp_path / "values.yaml", {
        "workloadNamespaces": [namespace],
        "trustDomain": {"name": trust_domain, "spec": {"certificates": {"defaultTTL": "30m"}}},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True},
        "image": {"repository": pushed_image.repository, "tag": pushed_image.tag},
    }))
    try:
        with injector_slot(cluster):
            took = install(cluster, release)
            objects = manifest(cluster, release.name, release_ns)
            kinds = {o["kind"] for o in objects}
            assert kinds >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service",
                             "StatefulSet", "PodDisruptionBudget", "MutatingWebhookConfiguration", "KopfPeering",
                             "TrustDomain", "ServiceMonitor", "PrometheusRule"}, kinds
            missing = [describe(o) for o in objects if not exists(cluster, o)]
            assert not missing, f"not created: {missing}"
            assert exists(cluster, {"kind": "KopfPeering", "apiVersion": "kopf.dev/v1",
                                    "metadata": {"name": "meshtls", "namespace": namespace}})

            # The replicas were admitted under the restricted Pod Security Standard, got their ordinals, run as
            # the chart's ServiceAccount, and carry the peering priority from their pod-index label.
            pods = json.loads(kubectl_ok(cluster, "get", "pods", "-n", release_ns, "-o", "json",
                                         "-l", "app.kubernetes.io/instance=meshtls"))["items"]
            assert sorted(p["metadata"]["labels"]["apps.kubernetes.io/pod-index"] for p in pods) == ["0", "1"]
            for pod in pods:
                assert pod["status"]["phase"] == "Running", pod["status"]
                assert pod["spec"]["serviceAccountName"] == release.service_account
                container = pod["spec"]["containers"][0]
                assert container["command"] == ["meshtls", "operator"]
                assert "--priority=$(MESHTLS_PRIORITY)" in container["args"]
                assert f"--namespace={namespace}" in container["args"]
                assert "--default-data-plane=envoy" in container["args"]  # the chart's default data plane
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["image"] == pushed_image.reference
                assert f"--sidecar-image={pushed_image.reference}" in container["args"]
            # the reference the chart rendered resolves, for an independent client, to the manifest pushed, whose
            # config runs as 65532 with the image's programs first on PATH (`meshtls operator`, `meshtls-proxy`)
            assert skopeo_inspect(pushed_image.reference)["Digest"] == pushed_image.digest
            image_config = skopeo_inspect(pushed_image.reference, config=True)["config"]
            assert image_config["User"] == "65532:65532"
            assert "PATH=/opt/meshtls/bin:" in " ".join(image_config["Env"])
            print(f"helm install --wait took {took:.1f} s for {len(objects)} objects")

            start = time.monotonic()
            helm(cluster, "uninstall", release.name, "-n", release_ns, "--wait", "--timeout", "120s")
            deadline = time.monotonic() + 60
            while left := [describe(o) for o in objects if exists(cluster, o)]:
                assert time.monotonic() < deadline, f"still there 60 s after helm uninstall: {left}"
                time.sleep(0.5)
            print(f"helm uninstall removed everything in {time.monotonic() - start:.1f} s")
        for crd in CHART_CRDS:
            assert exists(cluster, {"kind": "CustomResourceDefinition", "apiVersion": "apiextensions.k8s.io/v1",
                                    "metadata": {"name": crd}}), f"CRD {crd} was removed with the release"
    finally:
        helm(cluster, "uninstall", release.name, "-n", release_ns, "--ignore-not-found", check=False)
        delete_namespace(cluster, release_ns)


def test_webhook_template_matches_what_the_operator_writes(cluster: Cluster, tmp_path: Path) -> None:
    """The operator replaces the configuration's webhooks at every start: the chart must render the same ones (less
    the caBundle), or Helm and the operator would rewrite each other's selectors."""
    from meshtls.injection.webhook import webhook_definitions
    from meshtls.operator.settings import OperatorOptions

    # the identity finalizer's rule follows the namespaces served: the chart's list (deduplicated) or all of them
    for policy, scope, namespaces in (("Ignore", {}, ["default"]), ("Fail", {}, ["default"]),
                                      ("Ignore", {"workloadNamespaces": ["b", "a", "b"]}, ["b", "a"]),
                                      ("Fail", {"clusterWide": True}, [])):
        values = write_values(tmp_path / "values.yaml", {"webhook": {"failurePolicy": policy}, **scope})
        docs = render(cluster, "meshtls", "mesh-ops", values, "--show-only",
                      "templates/mutatingwebhookconfiguration.yaml")
        assert len(docs) == 1 and docs[0]["metadata"]["name"] == INJECTOR
        expected = webhook_definitions(OperatorOptions(operator_namespace="mesh-ops", webhook_port=9443,
                                                       webhook_service="meshtls-webhook",
                                                       webhook_failure_policy=policy, namespaces=namespaces), b"")
        for webhook in expected:
            webhook["clientConfig"] = {k: v for k, v in webhook["clientConfig"].items() if k != "caBundle"}
        assert docs[0]["webhooks"] == expected
        identity_hooks = [h for h in expected if h["rules"][0]["resources"] == ["workloadidentities"]]
        assert [h["failurePolicy"] for h in identity_hooks] == ["Ignore"]  # a down webhook never blocks users
