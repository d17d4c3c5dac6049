"""The classes of a WorkloadIdentity's sidecar fields, combined: what one field allows, another may forbid.

Inbound and outbound routes (0-3 each, ports from a small pool with collisions and meshtls's reserved ports), the
allow-list (exact, prefix/*, *, empty), the data plane and the Workload API (the identity's own, its TrustDomain's
default, the operator's default), and the identity's name (short, or long enough that its sidecar ConfigMap's name
is at the limit). For every combination, either the model refuses it naming a field that exists in the spec, or:
(a) the sidecar files the operator renders load back with the proxy's own parser and, for Envoy, are YAML with one
listener per route (test_envoy_render.check_invariants); (b) the containers the webhook injects for it listen on
pairwise-distinct ports, none an app port, each probed where it listens, and an app container declaring one of those
ports gets a warning naming it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshtls.api.model import (
    DataPlane,
    EffectiveIdentity,
    SpecError,
    parse_trust_domain,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.api.names import MAX_OBJECT_NAME, sidecar_configmap_name
from meshtls.api.ports import SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.config import load_sidecar_config
from meshtls.dataplane.envoy import ENVOY_CONFIG_FILE, ENVOY_FILES
from meshtls.dataplane.layout import CONFIG_DIR, CONFIG_FILE
from meshtls.injection.inject import WORKLOAD_API_CONTAINER, build_injection_patch
from meshtls.injection.render import injection_target, render_sidecar_config, render_sidecar_files
from meshtls.injection.target import (
    ENVOY_SIDECAR_NAME,
    SIDECAR_NAME,
    VOLUME_CONFIG,
    InjectionOptions,
    InjectionTarget,
)
from test_envoy_render import (
    check_invariants,
    lay_out,
    material,  # noqa: F401 (the fixture, for the Envoy runs below)
    validate,
    write_relocated,
)
from test_inject_golden import apply_json_patch

WALL_CLOCK = True  # the Envoy runs below load certificate files (`material`, from test_envoy_render)
TD = "cluster.local"

# Routes take their ports from DISTINCT in a drawn order (so that accepted combinations are common), then up to two
# of them are overwritten from PORTS: a collision, a shared appPort, or a reserved port.
DISTINCT = [8080, 8081, 8443, 9090, 9443, 10443, 15001, 15002, 15003]
MESHTLS_PORTS = (15090, 15091)  # the probe's own: the sidecar's admin port, the meshtls-workload-api container's
PORTS = [8080, 8443, 15001, *MESHTLS_PORTS]
PEERS = ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*",
         "spiffe://partner.example/*", "*"]
UPSTREAM_PEERS = ["spiffe://cluster.local/ns/data/sa/pg", "spiffe://cluster.local/ns/data/*",
                  "spiffe://partner.example/*"]
ADDRESSES = ["db.data.svc:5432", "10.96.0.42:443", "n:80", "api.partner.example:443"]  # `n`: a yaml-cpp boolean
# short; and one whose Secret name fits but whose sidecar ConfigMap name (<name>-meshtls-proxy) would not
NAMES = ["web", "api", "checkout", "w" * (MAX_OBJECT_NAME - 10)]
SWITCH = st.sampled_from([None, {"enabled": True}, {"enabled": False}])
CHOICE = st.sampled_from([None, DataPlane.MESHTLS_PROXY.value, DataPlane.ENVOY.value])
IDENTITY_FIELDS = {"port", "appPort", "listenPort"}


def _without_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


@st.composite
def combinations(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], DataPlane]:
    """(WorkloadIdentity body, TrustDomain body, operator default data plane)."""
    n_in, n_out = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    slots = draw(st.permutations(DISTINCT))[:2 * n_in + n_out]
    for i, port in draw(st.lists(st.tuples(st.integers(0, len(DISTINCT)), st.sampled_from(PORTS)), max_size=2)):
        if slots:
            slots[i % len(slots)] = port
    inbound = [{"port": slots[2 * k], "appPort": slots[2 * k + 1]} for k in range(n_in)]
    outbound = [{"listenPort": slots[2 * n_in + k], "address": draw(st.sampled_from(ADDRESSES)),
                 "peer": draw(st.sampled_from(UPSTREAM_PEERS))} for k in range(n_out)]
    spec = _without_none({
        "serviceAccountName": "web",
        "inbound": inbound or draw(st.sampled_from([None, []])),
        "outbound": outbound or draw(st.sampled_from([None, []])),
        "allowedPeers": draw(st.none() | st.lists(st.sampled_from(PEERS), max_size=3)),
        "dataPlane": draw(CHOICE),
        "workloadAPI": draw(SWITCH),
    })
    identity = {"metadata": {"namespace": "shop", "name": draw(st.sampled_from(NAMES)), "uid": "u"}, "spec": spec}
    td_spec = _without_none({"workloadAPI": draw(SWITCH), "sidecar": _without_none({"dataPlane": draw(CHOICE)})})
    trust_domain = {"metadata": {"name": TD}, "spec": td_spec}
    return identity, trust_domain, draw(st.sampled_from(list(DataPlane)))


def operator_view(identity: dict[str, Any], trust_domain: dict[str, Any],
                  default: DataPlane) -> tuple[EffectiveIdentity, dict[str, str]]:
    """What the operator does with the identity: parse, resolve, render its sidecar ConfigMap's files."""
    effective = resolve_identity(parse_workload_identity(identity), parse_trust_domain(trust_domain), default)
    return effective, render_sidecar_files(effective)


_STEP = re.compile(r"\.?([A-Za-z]+)|\[(\d+)\]")


def exists(body: dict[str, Any], path: str) -> bool:
    """Whether `spec.inbound[1].appPort`-style `path` names something that is in `body`."""
    node: Any = body
    for name, index in _STEP.findall(path):
        if name:
            if not isinstance(node, dict) or name not in node:
                return False
            node = node[name]
        else:
            if not isinstance(node, list) or int(index) >= len(node):
                return False
            node = node[int(index)]
    return "".join(f".{n}" if n else f"[{i}]" for n, i in _STEP.findall(path)).lstrip(".") == path


def pod_port_collides(spec: dict[str, Any]) -> bool:
    """The oracle: does anything in the pod listen twice on one port (the app's appPorts and meshtls's reserved ports
    included)? Two inbound routes to one appPort are fine (the app listens once)."""
    inbound, outbound = spec.get("inbound", []), spec.get("outbound", [])
    listeners = [*MESHTLS_PORTS, *(r["port"] for r in inbound), *(o["listenPort"] for o in outbound)]
    apps = {r["appPort"] for r in inbound}
    return len(set(listeners)) != len(listeners) or bool(apps & set(listeners))


# --- (b): what the injected containers listen on, read from what they run ------------------------------------------

def listening(container: dict[str, Any], files: dict[str, str]) -> tuple[list[int], int]:
    """Every port one injected container listens on (from the config it is started with), and its admin port."""
    command = container["command"]
    if container["name"] == SIDECAR_NAME:
        assert command[:3] == [SIDECAR_NAME, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"], command
        config = load_sidecar_config(files[CONFIG_FILE])
        assert config.admin_address == "0.0.0.0", "the kubelet's httpGet probe comes from outside the loopback"
        return [*(r.port for r in config.inbound), *(o.listen_port for o in config.outbound),
                config.admin_port], config.admin_port
    if container["name"] == ENVOY_SIDECAR_NAME:
        bootstrap = yaml.safe_load(files[ENVOY_CONFIG_FILE])
        admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        return [*(x["address"]["socket_address"]["port_value"] for x in bootstrap["static_resources"]["listeners"]),
                admin], admin
    assert container["name"] == WORKLOAD_API_CONTAINER, container["name"]
    admin = int(command[command.index("--admin-port") + 1])
    assert "--admin-address" not in command  # its default, 0.0.0.0: probed by the kubelet
    return [admin], admin


def probed_port(container: dict[str, Any]) -> int:
    probe = container["readinessProbe"]
    assert container["startupProbe"].get("httpGet") == probe.get("httpGet")
    if "httpGet" in probe:
        return int(probe["httpGet"]["port"])
    command = probe["exec"]["command"]
    return int(command[command.index("--admin-port") + 1])


def check_pod(identity: EffectiveIdentity, files: dict[str, str], target: InjectionTarget, extra_port: int | None,
              native: bool) -> None:
    spec = identity.spec
    app_ports = sorted({r.app_port for r in spec.inbound})
    declared = [*app_ports, *([extra_port] if extra_port is not None else [])]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "namespace": "shop"},
           "spec": {"serviceAccountName": "web", "containers": [
               {"name": "app", "image": "app", "ports": [{"containerPort": p} for p in declared]}]}}
    result = build_injection_patch(pod, target, InjectionOptions(native_sidecar=native))
    patched = apply_json_patch(pod, result.patch)["spec"]
    ours = [c for c in [*patched.get("initContainers", []), *patched["containers"]] if c["name"] != "app"]
    envoy = identity.data_plane is DataPlane.ENVOY
    assert [c["name"] for c in ours] == [ENVOY_SIDECAR_NAME if envoy else SIDECAR_NAME,
                                         *([WORKLOAD_API_CONTAINER] if envoy and identity.workload_api else [])]
    (config_volume,) = [v for v in patched["volumes"] if v["name"] == VOLUME_CONFIG]
    mounted = [item["key"] for item in config_volume["configMap"]["items"]]
    assert set(mounted) <= set(files), (mounted, sorted(files))  # the pod mounts only what the operator renders
    assert config_volume["configMap"]["name"] == sidecar_configmap_name(spec.name)
    every: list[int] = []
    for container in ours:
        ports, admin = listening(container, files)
        assert probed_port(container) == admin, container["name"]
        assert {p["containerPort"] for p in container.get("ports", [])} <= set(ports), container["name"]
        every += ports
    assert len(set(every)) == len(every), f"injected containers share a port: {sorted(every)}"
    assert not set(every) & set(app_ports), f"an injected container listens on an app port: {sorted(every)}"
    assert {SIDECAR_ADMIN_PORT} <= set(every) <= {SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT,
                                                   *(r.port for r in spec.inbound),
                                                   *(o.listen_port for o in spec.outbound)}
    warned = {int(m.group(1)) for w in result.warnings if (m := re.search(r"declares port (\d+),", w))}
    assert warned == ({extra_port} & set(every)), (extra_port, sorted(every), result.warnings)


# --- the property ---------------------------------------------------------------------------------------------------

# MESHTLS_FUZZ_EXAMPLES=5000 for a deeper run (as tests/test_admission_fuzz.py); the default takes ~10 s
PROBE = settings(max_examples=int(os.environ.get("MESHTLS_FUZZ_EXAMPLES", "200")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROBE
@given(combinations(), st.none() | st.sampled_from(PORTS + DISTINCT), st.booleans())
def test_every_combination_is_refused_naming_a_field_or_runs_with_distinct_ports(
    combination: tuple[dict[str, Any], dict[str, Any], DataPlane], extra_port: int | None, native: bool,
) -> None:
    body, trust_domain, default = combination
    spec = body["spec"]
    try:
        identity, files = operator_view(body, trust_domain, default)
    except SpecError as exc:
        assert exists(body, exc.field), (exc.field, str(exc))
        assert pod_port_collides(spec) or exc.field == "metadata.name", f"refused without a port collision: {exc}"
        if exc.field.rsplit(".", 1)[-1] in IDENTITY_FIELDS:
            assert str(_value(body, exc.field)) in exc.message, str(exc)
        return
    assert not pod_port_collides(spec), f"accepted with a port collision: {spec}"
    # (a) the files load back with the data plane's own parsers, and say what the spec says
    config = render_sidecar_config(identity)
    assert load_sidecar_config(files[CONFIG_FILE]) == config
    if identity.data_plane is DataPlane.ENVOY:
        assert set(files) == {CONFIG_FILE, *ENVOY_FILES}
        for text in files.values():
            yaml.safe_load(text)
        check_invariants(config, files)
    else:
        assert set(files) == {CONFIG_FILE}
    if not identity.has_sidecar:
        return  # not offered to the injector: its pods get no sidecar
    # its ConfigMap is its own: the name the pods mount is the identity's, whole
    assert len(sidecar_configmap_name(identity.spec.name)) == len(identity.spec.name) + len("-meshtls-proxy")
    # (b) the pod the webhook dresses with it
    check_pod(identity, files, injection_target(identity, "meshtls-bundle"), extra_port, native)


def _value(body: dict[str, Any], path: str) -> Any:
    node: Any = body
    for name, index in _STEP.findall(path):
        node = node[name] if name else node[int(index)]
    return node


def test_the_probe_reaches_every_class() -> None:
    """The combinations hold each class the property is about, so that it can fail on them: accepted Envoy pods with
    the Workload API container and routes both ways, accepted shared appPorts, each reserved port refused on each
    port field, a name refused only for a sidecar the TrustDomain's Workload API default gives it."""
    seen: set[str] = set()

    @settings(max_examples=800, database=None, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(combinations())
    def tally(combination: tuple[dict[str, Any], dict[str, Any], DataPlane]) -> None:
        body, trust_domain, _ = combination
        try:
            identity = operator_view(*combination)[0]
        except SpecError as exc:
            if exc.field.rsplit(".", 1)[-1] in IDENTITY_FIELDS and _value(body, exc.field) in MESHTLS_PORTS:
                seen.add(f"{_value(body, exc.field)} refused on {exc.field.rsplit('.', 1)[-1]}")
            if exc.field == "metadata.name" and "workloadAPI" not in body["spec"] and trust_domain["spec"].get(
                    "workloadAPI") == {"enabled": True} and not body["spec"].get("inbound") \
                    and not body["spec"].get("outbound"):
                seen.add("name refused for the TrustDomain's Workload API")
            return
        spec = identity.spec
        if identity.data_plane is DataPlane.ENVOY and identity.workload_api and spec.inbound and spec.outbound \
                and spec.allowed_peers:
            seen.add("Envoy with the Workload API and routes both ways")
        if len({r.app_port for r in spec.inbound}) < len(spec.inbound):
            seen.add("shared appPort")

    tally()
    wanted = {"Envoy with the Workload API and routes both ways", "shared appPort",
              "name refused for the TrustDomain's Workload API",
              *(f"{port} refused on {field}" for port in MESHTLS_PORTS for field in IDENTITY_FIELDS)}
    assert wanted <= seen, sorted(wanted - seen)


# --- a few of these combinations through the real Envoy (`envoy --mode validate`, ~1 s each) ------------------------

@settings(max_examples=10, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(combination=combinations())
def test_envoy_validates_accepted_combinations_as_the_operator_renders_them(
    combination: tuple[dict[str, Any], dict[str, Any], DataPlane], tmp_path_factory: pytest.TempPathFactory,
    material: dict[str, bytes],  # noqa: F811 (the fixture imported from test_envoy_render)
) -> None:
    body, trust_domain, _ = combination
    try:
        identity, files = operator_view(body, trust_domain, DataPlane.ENVOY)
    except SpecError:
        identity = None
    assume(identity is not None and identity.data_plane is DataPlane.ENVOY
           and bool(identity.spec.inbound or identity.spec.outbound))
    assert identity is not None
    config = render_sidecar_config(identity)
    dirs = lay_out(tmp_path_factory.mktemp("combination"), material, config.identity_dir, config.bundle_dir)
    write_relocated({k: v for k, v in files.items() if k in ENVOY_FILES}, config, dirs)
    validate(dirs["config"])
