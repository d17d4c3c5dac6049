"""What the injector needs to know about an identity, and how it dresses a pod. Shared by webhook and operator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshtls.api.model import DataPlane
from meshtls.api.names import DEFAULT_SIDECAR_IMAGE
from meshtls.api.ports import SIDECAR_ADMIN_PORT

SIDECAR_NAME = "meshtls-proxy"
ENVOY_SIDECAR_NAME = "meshtls-envoy"  # the container of the Envoy data plane (its command is the launcher's name too)
ENVOY_DATA_PLANE = DataPlane.ENVOY.value
MESHTLS_PROXY_DATA_PLANE = DataPlane.MESHTLS_PROXY.value
VOLUME_IDENTITY = "meshtls-identity"
VOLUME_BUNDLE = "meshtls-bundle"
VOLUME_CONFIG = "meshtls-config"
VOLUME_WORKLOAD_API = "meshtls-workload-api"


@dataclass(frozen=True)
class InjectionTarget:
    """The WorkloadIdentity a pod will carry, reduced to what the pod patch needs."""

    identity_name: str
    service_account: str
    spiffe_id: str
    secret_name: str
    config_map: str
    bundle_config_map: str
    pod_selector: Mapping[str, str] = field(default_factory=dict)
    inbound_ports: tuple[int, ...] = ()
    outbound_ports: tuple[int, ...] = ()  # the sidecar's listeners on 127.0.0.1: only for the port warnings
    admin_port: int = SIDECAR_ADMIN_PORT
    workload_api: bool = False  # the SPIFFE Workload API socket in the pod (docs/workload-api.md)
    data_plane: str = MESHTLS_PROXY_DATA_PLANE  # meshtls.api.model.DataPlane's value: which container the pod gets

    def selects(self, pod_labels: Mapping[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in self.pod_selector.items())


@dataclass(frozen=True)
class InjectionOptions:
    image: str = DEFAULT_SIDECAR_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "10m"
    memory_request: str = "32Mi"
    memory_limit: str = "96Mi"
    # Envoy's RSS is ~70 MB, most of it its 107 MB binary's pages, which the container's memory cgroup counts too
    envoy_memory_limit: str = "192Mi"
    native_sidecar: bool = True  # an init container with restartPolicy Always (Kubernetes >= 1.29)
