"""The sidecar's configuration: what the operator renders into a ConfigMap and `meshtls-proxy` reads.

One schema, one parser, used on both sides so they can never disagree. Pure: no Kubernetes, no sockets. Where it
is mounted and what the mounted volumes hold is `meshtls.dataplane.layout`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import yaml

from meshtls.api.ports import RESERVED_PORTS, SIDECAR_ADMIN_PORT, port_collision
from meshtls.dataplane.layout import BUNDLE_DIR, IDENTITY_DIR
from meshtls.pki.errors import PKIError
from meshtls.pki.spiffe import parse_spiffe_id

DEFAULT_ADMIN_PORT = SIDECAR_ADMIN_PORT
DEFAULT_RELOAD_INTERVAL = dt.timedelta(seconds=1)


@dataclass(frozen=True)
class InboundRoute:
    """TLS on `port` (all interfaces), client certificate required, peer in `allow`, then plaintext to the app."""

    port: int
    app_port: int
    allow: tuple[str, ...] = ()  # SPIFFE IDs, exact or `prefix/*`; empty allows nobody


@dataclass(frozen=True)
class OutboundRoute:
    """Plaintext on 127.0.0.1:`listen_port`, then TLS to `address` whose certificate must carry `peer`."""

    listen_port: int
    address: str  # host:port
    peer: str  # expected SPIFFE ID of the upstream, or a `prefix/*` pattern


@dataclass(frozen=True)
class SidecarConfig:
    spiffe_id: str
    identity_dir: str = IDENTITY_DIR
    bundle_dir: str = BUNDLE_DIR
    inbound: tuple[InboundRoute, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_address: str = "127.0.0.1"
    reload_interval: dt.timedelta = DEFAULT_RELOAD_INTERVAL
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spiffeId": self.spiffe_id,
            "identityDir": self.identity_dir,
            "bundleDir": self.bundle_dir,
            "inbound": [{"port": r.port, "appPort": r.app_port, "allow": list(r.allow)} for r in self.inbound],
            "outbound": [{"listenPort": r.listen_port, "address": r.address, "peer": r.peer} for r in self.outbound],
            "admin": {"port": self.admin_port, "address": self.admin_address},
            "reloadIntervalSeconds": self.reload_interval.total_seconds(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _port(value: Any, field_path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise PKIError(field_path, f"{value!r} is not a port number (1-65535)")
    return value


def _pattern(value: Any, field_path: str) -> str:
    if not isinstance(value, str):
        raise PKIError(field_path, "must be a SPIFFE ID string")
    if value == "*":
        return value
    parse_spiffe_id(value[:-2] if value.endswith("/*") else value, field_path)
    return value


def _mapping(value: Any, field_path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PKIError(field_path, f"must be a mapping, not {type(value).__name__}")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise PKIError(key, f"must be a list, not {type(value).__name__}")
    return value


def check_listening_ports(inbound: list[InboundRoute], outbound: list[OutboundRoute], admin_port: int) -> None:
    """Every port the sidecar, the app or meshtls's other container listens on in the pod is used once: the same
    rule as the WorkloadIdentity's (meshtls.api.ports), with this config's own admin port in the sidecar's place."""
    if admin_port in RESERVED_PORTS and admin_port != SIDECAR_ADMIN_PORT:
        raise PKIError("admin.port", f"{admin_port} is already {RESERVED_PORTS[admin_port]}: each port may be used "
                                     "once")
    reserved = {admin_port: "admin.port",
                **{p: what for p, what in RESERVED_PORTS.items() if p != SIDECAR_ADMIN_PORT}}
    collision = port_collision([(r.port, r.app_port) for r in inbound], [u.listen_port for u in outbound], reserved)
    if collision:
        raise PKIError(collision.field, collision.message)


def parse_sidecar_config(data: dict[str, Any]) -> SidecarConfig:
    """Validate a config mapping; errors name the field path (e.g. `inbound[0].appPort`)."""
    if not isinstance(data, dict):
        raise PKIError("config", "must be a mapping")
    spiffe_id = data.get("spiffeId")
    if not isinstance(spiffe_id, str):
        raise PKIError("spiffeId", "is required")
    parse_spiffe_id(spiffe_id, "spiffeId")
    inbound = []
    for i, r in enumerate(_list(data, "inbound")):
        r = _mapping(r, f"inbound[{i}]")
        allow = r.get("allow") or []
        if not isinstance(allow, list):
            raise PKIError(f"inbound[{i}].allow", "must be a list of SPIFFE IDs or prefix/* patterns")
        inbound.append(InboundRoute(
            port=_port(r.get("port"), f"inbound[{i}].port"),
            app_port=_port(r.get("appPort"), f"inbound[{i}].appPort"),
            allow=tuple(_pattern(a, f"inbound[{i}].allow[{j}]") for j, a in enumerate(allow)),
        ))
    outbound = []
    for i, r in enumerate(_list(data, "outbound")):
        r = _mapping(r, f"outbound[{i}]")
        address = r.get("address")
        host, _, port = str(address or "").rpartition(":")
        if not host or not port.isdigit() or port.startswith("0") or len(port) > 5:
            raise PKIError(f"outbound[{i}].address", f"{address!r} must be host:port (port 1-65535)")
        _port(int(port), f"outbound[{i}].address")
        outbound.append(OutboundRoute(
            listen_port=_port(r.get("listenPort"), f"outbound[{i}].listenPort"),
            address=str(address),
            peer=_pattern(r.get("peer"), f"outbound[{i}].peer"),
        ))
    admin = _mapping(data.get("admin") or {}, "admin")
    raw_interval = data.get("reloadIntervalSeconds", DEFAULT_RELOAD_INTERVAL.total_seconds())
    if isinstance(raw_interval, bool) or not isinstance(raw_interval, int | float):
        raise PKIError("reloadIntervalSeconds", f"{raw_interval!r} is not a number of seconds")
    interval = float(raw_interval)
    if not 0.05 <= interval <= 60:
        raise PKIError("reloadIntervalSeconds", f"{interval} is outside 0.05-60")
    admin_port = _port(admin.get("port", DEFAULT_ADMIN_PORT), "admin.port")
    check_listening_ports(inbound, outbound, admin_port)
    return SidecarConfig(
        spiffe_id=spiffe_id,
        identity_dir=str(data.get("identityDir", IDENTITY_DIR)),
        bundle_dir=str(data.get("bundleDir", BUNDLE_DIR)),
        inbound=tuple(inbound),
        outbound=tuple(outbound),
        admin_port=admin_port,
        admin_address=str(admin.get("address", "127.0.0.1")),
        reload_interval=dt.timedelta(seconds=interval),
    )


def load_sidecar_config(text: str) -> SidecarConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PKIError("config", f"is not valid YAML ({exc})") from None
    return parse_sidecar_config(data)
