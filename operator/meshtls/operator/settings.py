"""How this operator process runs: filled from `meshtls operator` flags before kopf starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshtls.api.model import DEFAULT_DATA_PLANE
from meshtls.api.names import DEFAULT_SIDECAR_IMAGE


@dataclass
class OperatorOptions:
    operator_namespace: str = "meshtls-system"
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    kubeconfig: str | None = None
    metrics_port: int = 9090  # 0 disables
    health_port: int = 8081
    peering: str | None = None  # kopf peering name; None: standalone (one instance)
    priority: int = 0
    peering_lifetime: int = 60  # seconds before a silent peer (killed replica) is forgotten
    webhook_port: int = 0  # 0: no admission webhook
    webhook_host: str = "127.0.0.1"  # URL mode: the address the API server calls
    webhook_service: str | None = None  # Service mode (in-cluster): name of the Service in operator_namespace
    webhook_failure_policy: str = "Ignore"
    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    default_data_plane: str = DEFAULT_DATA_PLANE  # when neither the identity nor its TrustDomain names one


OPTIONS = OperatorOptions()
