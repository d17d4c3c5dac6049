"""The operator's side of the sidecar: one identity's spec rendered into the proxy's configuration."""

from __future__ import annotations

from meshtls.api.model import EffectiveIdentity
from meshtls.sidecar.config import InboundRoute, OutboundRoute, SidecarConfig
from meshtls.sidecar.target import InjectionTarget, sidecar_configmap_name


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
    )
