"""Two replicas with kopf peering: the paused one may receive admission requests (the Service balances over both)
and must still inject, by looking identities up through the API instead of its empty in-memory index."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess, free_port

REPO = Path(__file__).resolve().parents[1]
PEERING = "e2e-standby"


@pytest.fixture
def peered_operators(cluster: Cluster, operator: OperatorProcess, tmp_path: Path) -> Iterator[OperatorProcess]:
    cluster.kubectl("apply", "-f", str(REPO / "charts/meshtls/crds/kopf.dev-peerings.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/clusterkopfpeerings.kopf.dev")
    cluster.kubectl("apply", "-f", "-", input=f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\n"
                                              f"metadata: {{name: {PEERING}}}\n")
    operator.stop()
    peering = ["--peering", PEERING, "--peering-lifetime", "10"]
    active = OperatorProcess(cluster.kubeconfig, tmp_path, "active", [
        *peering, "--priority", "200", "--webhook-port", str(free_port()), "--webhook-failure-policy", "Fail"])
    standby = OperatorProcess(cluster.kubeconfig, tmp_path, "standby", [
        *peering, "--priority", "100", "--webhook-port", str(free_port()), "--webhook-failure-policy", "Fail"])
    try:
        active.start()
        standby.start()  # started last: the webhook configuration now points at the paused replica
        yield standby
    finally:
        standby.stop()
        active.stop()
        operator.start()  # the session operator points the webhook back at itself


def test_a_paused_replica_still_injects(kube: Kube, kube_api: client.ApiClient, trust_domain: str,
                                        peered_operators: OperatorProcess) -> None:
    core = client.CoreV1Api(kube_api)
    ns = f"e2e-standby-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=ns, labels={"meshtls.dev/inject": "enabled", "e2e": "true"})))
    try:
        core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="web")))
        kube.create_identity(ns, "web", {"serviceAccountName": "web", "trustDomain": trust_domain,
                                         "inbound": [{"port": 8443, "appPort": 8080}]})
        wait_for("the active replica to issue", lambda: is_ready(kube.identity(ns, "web")), 30)
        core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                                        "spec": {"serviceAccountName": "web",
                                                 "containers": [{"name": "app", "image": "example/app"}]}})
        pod = core.read_namespaced_pod("web", ns)
        names = [c.name for c in pod.spec.init_containers or []]
        assert "meshtls-proxy" in names, f"not injected by the standby: {names}"
        assert "IdentityNotFound" not in peered_operators.log_tail(200)
    finally:
        core.delete_namespace(ns, propagation_policy="Background")
