"""The operator's side of the sidecar: one identity's spec rendered into its data plane's configuration."""

from __future__ import annotations

import re
from collections.abc import Mapping

from meshtls.api.model import DataPlane, EffectiveIdentity, SpecError
from meshtls.api.names import sidecar_configmap_name
from meshtls.api.reasons import Reason
from meshtls.dataplane.config import InboundRoute, OutboundRoute, SidecarConfig
from meshtls.dataplane.envoy import render_envoy_files
from meshtls.dataplane.layout import CONFIG_FILE
from meshtls.injection.target import InjectionTarget
from meshtls.pki.errors import PKIError


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


_ALLOW_ITEM = re.compile(r"inbound\[\d+\]\.allow(\[\d+\])?")
_ROUTE_FIELD = re.compile(r"(inbound|outbound)\[\d+\](\.\w+)?")


def spec_field(config_field: str) -> str:
    """The WorkloadIdentity field a sidecar config field was rendered from (`outbound[0].address` ->
    `spec.outbound[0].address`; an inbound route's allow-list is spec.allowedPeers)."""
    allow = _ALLOW_ITEM.fullmatch(config_field)
    if allow:
        return "spec.allowedPeers" + (allow.group(1) or "")
    if _ROUTE_FIELD.fullmatch(config_field):
        return "spec." + config_field
    return "spec"


def render_sidecar_files(identity: EffectiveIdentity) -> dict[str, str]:
    """The sidecar ConfigMap's data: `proxy.yaml` always (the model, and what a meshtls-proxy pod of this identity
    still reads after a switch), Envoy's bootstrap and SDS files when the identity's data plane is Envoy.

    A spec Envoy cannot run with is refused here, naming the spec field (SpecError, reason InvalidSpec), so the
    operator reports it as a condition and a Warning instead of an Envoy that does not start in the pod."""
    config = render_sidecar_config(identity)
    files = {CONFIG_FILE: config.to_yaml()}
    if identity.data_plane is DataPlane.ENVOY:
        try:
            files |= render_envoy_files(config)
        except PKIError as exc:
            raise SpecError(spec_field(exc.field), f"cannot be rendered for the Envoy data plane: {exc.message}",
                            reason=Reason.INVALID_SPEC) from None
    return files


# The API server refuses a ConfigMap whose data (keys and values) exceeds 1 MiB ("Too long"); etcd's request limit
# is higher, so this is the one that bites.
CONFIGMAP_DATA_LIMIT = 1024 * 1024


def configmap_data_size(data: Mapping[str, str] | str) -> int:
    files = {CONFIG_FILE: data} if isinstance(data, str) else data
    return sum(len(k.encode()) + len(v.encode()) for k, v in files.items())


def check_publishable(identity: EffectiveIdentity, data: Mapping[str, str] | str) -> None:
    """Refuse, with the fields that make it big, a sidecar ConfigMap (every file in it: proxy.yaml and, for Envoy,
    its bootstrap that repeats the allow-list per inbound listener) the API server would not store."""
    size = configmap_data_size(data)
    if size <= CONFIGMAP_DATA_LIMIT:
        return
    spec = identity.spec
    parts = {
        "spec.allowedPeers": sum(len(p) for p in spec.allowed_peers) * max(len(spec.inbound), 1),
        "spec.inbound": len(spec.inbound),
        "spec.outbound": sum(len(u.address) + len(u.peer or "") for u in spec.outbound),
    }
    field = max(parts, key=lambda k: parts[k])
    files = ", ".join(sorted(data)) if not isinstance(data, str) else CONFIG_FILE
    raise SpecError(field, f"the rendered sidecar config ({files}; data plane {identity.data_plane}) is {size} "
                           f"bytes, over the {CONFIGMAP_DATA_LIMIT}-byte ConfigMap limit (allowedPeers "
                           f"{len(spec.allowed_peers)} entries repeated on {len(spec.inbound)} inbound routes, "
                           f"{len(spec.outbound)} outbound): shorten {field}",
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
        outbound_ports=tuple(u.listen_port for u in spec.outbound),
        workload_api=identity.workload_api,
        data_plane=identity.data_plane.value,
    )
