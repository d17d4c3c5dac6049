"""The operator's side of the sidecar: one identity's spec rendered into the proxy's configuration."""

from __future__ import annotations

from meshtls.api.model import EffectiveIdentity, SpecError
from meshtls.api.names import sidecar_configmap_name
from meshtls.api.reasons import Reason
from meshtls.dataplane.config import InboundRoute, OutboundRoute, SidecarConfig
from meshtls.dataplane.layout import CONFIG_FILE
from meshtls.injection.target import InjectionTarget


def render_sidecar_config(identity: EffectiveIdentity) -> SidecarConfig:
    spec = identity.spec
    allow = tuple(spec.allowed_peers)
    return SidecarConfig(
        spiffe_id=str(identity.spiffe_id),
        inbound=tuple(InboundRoute(p.port, p.app_port, allow) for p in spec.inbound),
        outbound=tuple(OutboundRoute(u.listen_port, u.address, u.peer) for u in spec.outbound),
        # kubelet probes come from outside the pod's loopback
        admin_address="0.0.0.0",
    )


# The API server refuses a ConfigMap whose data (keys and values) exceeds 1 MiB ("Too long"); etcd's request limit
# is higher, so this is the one that bites.
CONFIGMAP_DATA_LIMIT = 1024 * 1024


def check_publishable(identity: EffectiveIdentity, text: str) -> None:
    """Refuse, with the fields that make it big, a sidecar config the API server would not store."""
    size = len(CONFIG_FILE.encode()) + len(text.encode())
    if size <= CONFIGMAP_DATA_LIMIT:
        return
    spec = identity.spec
    parts = {
        "spec.allowedPeers": sum(len(p) for p in spec.allowed_peers) * max(len(spec.inbound), 1),
        "spec.inbound": len(spec.inbound),
        "spec.outbound": sum(len(u.address) + len(u.peer or "") for u in spec.outbound),
    }
    field = max(parts, key=lambda k: parts[k])
    raise SpecError(field, f"the rendered sidecar config is {size} bytes, over the {CONFIGMAP_DATA_LIMIT}-byte "
                           f"ConfigMap limit (allowedPeers {len(spec.allowed_peers)} entries repeated on "
                           f"{len(spec.inbound)} inbound routes, {len(spec.outbound)} outbound): shorten {field}",
                    reason=Reason.SIDECAR_CONFIG_TOO_LARGE)


def injection_target(identity: EffectiveIdentity, bundle_config_map: str) -> InjectionTarget:
    spec = identity.spec
    return InjectionTarget(
        identity_name=spec.name,
        service_account=spec.service_account,
        spiffe_id=str(identity.spiffe_id),
        secret_name=spec.secret_name,
        config_map=sidecar_configmap_name(spec.name),
        bundle_config_map=bundle_config_map,
        pod_selector=dict(spec.pod_selector),
        inbound_ports=tuple(p.port for p in spec.inbound),
        workload_api=identity.workload_api,
    )
