"""The ports meshtls's own containers listen on in a pod, and the one rule every listener in the pod obeys.

A pod's containers share one network namespace: the sidecar's inbound and outbound listeners, the app's appPorts,
the sidecar's admin port and, beside Envoy, the Workload API container's admin port must all differ, or one of them
fails to bind and the pod never gets Ready. The WorkloadIdentity model (meshtls.api.model, paths under `spec.`) and
the sidecar config parser (meshtls.dataplane.config, paths of proxy.yaml) both judge through `port_collision`; the
CRD's CEL rules say the same to the API server (crds/workloadidentities.meshtls.dev.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SIDECAR_ADMIN_PORT = 15090  # the sidecar's admin and /metrics (meshtls-proxy or Envoy)
WORKLOAD_API_ADMIN_PORT = 15091  # the meshtls-workload-api container's admin, injected beside Envoy
# Reserved in every pod whatever its data plane: a spec is judged before its pods exist, and a data plane or
# workloadAPI switch must not turn an accepted spec into one that cannot run.
RESERVED_PORTS: Mapping[int, str] = {
    SIDECAR_ADMIN_PORT: "the sidecar's admin and metrics port",
    WORKLOAD_API_ADMIN_PORT: "the Workload API container's admin port (meshtls-workload-api, beside Envoy)",
}


@dataclass(frozen=True)
class PortCollision:
    field: str  # the later of the two listeners, e.g. `spec.inbound[1].port`
    message: str


def port_collision(inbound: Sequence[tuple[int, int]], outbound: Sequence[int], reserved: Mapping[int, str],
                   prefix: str = "") -> PortCollision | None:
    """The first port taken twice among (inbound port, appPort) pairs, outbound listen ports and `reserved`
    (port -> what holds it), or None. Field paths are `{prefix}inbound[i].port` and so on.

    Two inbound routes may lead to one appPort (the app listens once); everything else is used once."""
    owner: dict[int, str] = dict(reserved)
    for i, (port, _) in enumerate(inbound):
        field = f"{prefix}inbound[{i}].port"
        if port in owner:
            return PortCollision(field, f"{port} is already {owner[port]}: each port may be used once")
        owner[port] = field
    apps: dict[int, str] = {}
    for i, (_, app_port) in enumerate(inbound):  # the app listens on appPort in the same pod
        if app_port in owner:
            return PortCollision(f"{prefix}inbound[{i}].appPort",
                                 f"{app_port} is already {owner[app_port]}: the app's port must differ from every "
                                 "port the sidecar listens on")
        apps.setdefault(app_port, f"{prefix}inbound[{i}].appPort")
    for i, listen_port in enumerate(outbound):
        field = f"{prefix}outbound[{i}].listenPort"
        taken = owner.get(listen_port) or apps.get(listen_port)
        if taken:
            return PortCollision(field, f"{listen_port} is already {taken}: each port may be used once")
        owner[listen_port] = field
    return None
