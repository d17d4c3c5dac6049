"""The local control plane behaves like a real cluster: the harness's own acceptance checks."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import pytest
from kubernetes import client

from e2e.harness import Cluster
from e2e.harness.build import KUBERNETES_VERSION

pytestmark = pytest.mark.e2e


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_readyz(cluster: Cluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_server_version(cluster: Cluster, kube_api: client.ApiClient) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert version["clientVersion"]["gitVersion"] == KUBERNETES_VERSION
    assert client.VersionApi(kube_api).get_code().git_version == KUBERNETES_VERSION


def test_deployment_becomes_available_on_kwok_nodes(
    cluster: Cluster, kube_api: client.ApiClient, namespace: str
) -> None:
    cluster.kubectl("create", "deployment", "web", "--image=nginx", "--replicas=3", "-n", namespace)
    cluster.kubectl("rollout", "status", "deploy/web", "-n", namespace, "--timeout=90s", timeout=100)
    core = client.CoreV1Api(kube_api)
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    kwok_nodes = {n.metadata.name for n in core.list_node(label_selector="type=kwok").items}
    for pod in pods:
        assert pod.status.phase == "Running", pod.status
        assert pod.spec.node_name in kwok_nodes
        assert pod.status.pod_ip


def test_kwok_nodes_are_ready_and_renew_leases(kube_api: client.ApiClient) -> None:
    """Without Lease renewals the node lifecycle controller flips the nodes NotReady after 50 s."""
    leases = client.CoordinationV1Api(kube_api)
    nodes = client.CoreV1Api(kube_api).list_node(label_selector="type=kwok").items
    assert nodes, "no nodes labelled type=kwok"
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True", node.status.conditions
        lease = leases.read_namespaced_lease(node.metadata.name, "kube-node-lease")
        assert lease.spec.renew_time is not None


def test_service_account_token(cluster: Cluster, kube_api: client.ApiClient, namespace: str) -> None:
    token = cluster.kubectl("create", "token", "default", "-n", namespace).stdout.strip()
    _header, payload, _sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:default"
    review = client.AuthenticationV1Api(kube_api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    assert review.status.authenticated, review.status
    assert review.status.user.username == f"system:serviceaccount:{namespace}:default"


def test_namespace_with_objects_is_deleted_within_60s(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "deployment", "web", "--image=nginx", "--replicas=2", "-n", namespace)
    cluster.kubectl("create", "configmap", "cm", "--from-literal=a=b", "-n", namespace)
    cluster.kubectl("create", "secret", "generic", "s", "--from-literal=a=b", "-n", namespace)
    cluster.kubectl("create", "service", "clusterip", "web", "--tcp=80:80", "-n", namespace)
    cluster.kubectl("rollout", "status", "deploy/web", "-n", namespace, "--timeout=60s", timeout=70)
    start = time.monotonic()
    cluster.kubectl("delete", "namespace", namespace, "--wait", "--timeout=60s", timeout=70)
    assert time.monotonic() - start < 60
    gone = cluster.kubectl("get", "namespace", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_owner_reference_garbage_collection(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    ref = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid, block_owner_deletion=True
    )
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref]))
    )
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def dependent_gone() -> bool:
        names = [cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items]
        return "dependent" not in names

    _wait("the garbage collector to delete the dependent ConfigMap", dependent_gone, 30)


def test_restart_apiserver(cluster: Cluster, kube_api: client.ApiClient) -> None:
    if cluster.external:
        pytest.skip("restart_apiserver needs a cluster started by the harness (this one is external)")
    cluster.restart_apiserver()
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"
    # The controllers reconnect: a namespace created after the restart gets its default ServiceAccount.
    core = client.CoreV1Api(kube_api)
    name = f"e2e-after-restart-{int(time.time())}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        _wait(
            "the default ServiceAccount after an apiserver restart",
            lambda: bool(core.list_namespaced_service_account(name).items),
            30,
        )
    finally:
        core.delete_namespace(name)
