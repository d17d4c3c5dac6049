"""What the injector needs to know about an identity, and how it dresses a pod. Shared by webhook and operator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshtls.api.names import DEFAULT_SIDECAR_IMAGE

SIDECAR_NAME = "meshtls-proxy"
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
    admin_port: int = 15090
    workload_api: bool = False  # the SPIFFE Workload API socket in the pod (docs/workload-api.md)

    def selects(self, pod_labels: Mapping[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in self.pod_selector.items())


@dataclass(frozen=True)
class InjectionOptions:
    image: str = DEFAULT_SIDECAR_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "10m"
    memory_request: str = "32Mi"
    memory_limit: str = "96Mi"
    native_sidecar: bool = True  # an init container with restartPolicy Always (Kubernetes >= 1.29)
