"""What the injector needs to know about an identity, and how it dresses a pod. Shared by webhook and operator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SIDECAR_NAME = "meshtls-proxy"
DEFAULT_IMAGE = "meshtls:0.1.0"
VOLUME_IDENTITY = "meshtls-identity"
VOLUME_BUNDLE = "meshtls-bundle"
VOLUME_CONFIG = "meshtls-config"


def sidecar_configmap_name(identity_name: str) -> str:
    """The ConfigMap holding one identity's rendered proxy.yaml."""
    return f"{identity_name}-meshtls-proxy"[:253]


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

    def selects(self, pod_labels: Mapping[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in self.pod_selector.items())


@dataclass(frozen=True)
class InjectionOptions:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "10m"
    memory_request: str = "32Mi"
    memory_limit: str = "96Mi"
    native_sidecar: bool = True  # an init container with restartPolicy Always (Kubernetes >= 1.29)
