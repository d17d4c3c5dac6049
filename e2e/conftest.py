"""Fixtures for the e2e suites: the local control plane (or $KUBECONFIG with MESHTLS_USE_EXISTING_CLUSTER=1).

A test that needs the cluster fails (never skips) when it cannot be built or started.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from testsupport.containers import SIDECAR_FROM_ENV, image_runtime

from e2e.harness import BuildError, Cluster, ComponentError, HarnessError, build_all
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.operator_process import OperatorProcess, free_port

if TYPE_CHECKING:
    from testsupport.image import Image

    from e2e.registry import LoopbackRegistry

_FAILURES = (HarnessError, BuildError, ComponentError)


@dataclass(frozen=True)
class PushedImage:
    repository: str  # 127.0.0.1:PORT/meshtls
    tag: str
    digest: str  # sha256:... of the pushed manifest

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


_build_error: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds missing binaries before the first test, outside any per-test timeout, with visible progress."""
    global _build_error
    if not any("cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def log(msg: str) -> None:
        if reporter is not None:
            reporter.write_line(msg)

    try:
        build_all(log)
    except BuildError as e:
        _build_error = str(e)
    if os.environ.get(SIDECAR_FROM_ENV, "image") == "image":
        log("the sidecars' image: the cached one, or built now (make image; MESHTLS_SIDECAR_FROM=venv skips it)")
        try:
            image_runtime()
        except RuntimeError as e:  # said again, failing them, by the tests that run a sidecar
            log(f"the sidecars' image is not available: {e}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if _build_error is not None:
        pytest.fail(f"the e2e cluster's binaries could not be built: {_build_error}", pytrace=False)
    try:
        c = Cluster.start(cleanup_on_exit=True)
    except _FAILURES as e:
        pytest.fail(f"the e2e cluster could not start: {e}", pytrace=False)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def kube_api(cluster: Cluster) -> Iterator[client.ApiClient]:
    """A `kubernetes.client.ApiClient` for the cluster (admin credentials)."""
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(kube_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted afterwards without waiting."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"e2e-{slug}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"e2e": "true"})))
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name}: no default ServiceAccount after 30 s (kube-controller-manager?)")
        time.sleep(0.1)
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:  # the test may have deleted it itself
            raise


# --- meshtls on the cluster --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
E2E_TRUST_DOMAIN = "e2e.meshtls.test"


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The CRDs from crds/, applied as a user would (kubectl apply), and established."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trustdomains.meshtls.dev",
                    "crd/workloadidentities.meshtls.dev")
    cluster.kubectl("create", "namespace", "meshtls-system", check=False)


@pytest.fixture(scope="session")
def kube(kube_api: client.ApiClient) -> Kube:
    return Kube(kube_api)


@pytest.fixture(scope="session")
def operator(cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator process for the session; tests may stop and start it (it is restarted if left stopped)."""
    log_dir = Path(os.environ.get("MESHTLS_E2E_LOGS", tmp_path_factory.mktemp("operator-logs")))
    # URL-mode webhook on loopback; Fail so that a broken injector shows up as a refused pod, not a silent skip
    proc = OperatorProcess(cluster.kubeconfig, log_dir, extra_args=[
        "--webhook-port", str(free_port()), "--webhook-failure-policy", "Fail"])
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    if not operator.running:
        operator.start()
    return operator


@pytest.fixture(scope="session")
def trust_domain(kube: Kube, operator: OperatorProcess) -> str:
    """A trust domain with short-lived certificates allowed (10 s minimum), so tests watch real rotations."""
    kube.create_trust_domain(E2E_TRUST_DOMAIN, {"certificates": {"minTTL": "10s", "defaultTTL": "1h"}})
    wait_for("the e2e TrustDomain to be Ready", lambda: is_ready(kube.trust_domain(E2E_TRUST_DOMAIN)), 30)
    return E2E_TRUST_DOMAIN


@pytest.fixture(scope="session")
def openssl() -> str:
    from testsupport.tools import require_openssl

    return require_openssl()


@pytest.fixture(scope="session")
def built_image() -> Image:
    """The meshtls image for this tree (testsupport.image: built with buildah, or the cached one)."""
    from testsupport.image import ImageError, ensure_image

    try:
        return ensure_image()
    except ImageError as exc:
        pytest.fail(f"the meshtls image is needed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def registry() -> Iterator[LoopbackRegistry]:
    """A real registry on loopback (Debian's docker-registry), empty at the start of the session."""
    from e2e.registry import LoopbackRegistry, RegistryError

    try:
        reg = LoopbackRegistry().start()
    except RegistryError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def pushed_image(built_image: Image, registry: LoopbackRegistry) -> PushedImage:
    """The image pushed to the loopback registry (`make image-push REGISTRY=...` does the same)."""
    from testsupport.image import ImageError, push

    try:
        digest = push(built_image, registry.address)
    except ImageError as exc:
        pytest.fail(str(exc), pytrace=False)
    return PushedImage(f"{registry.address}/meshtls", built_image.version_reference.rsplit(":", 1)[1], digest)
