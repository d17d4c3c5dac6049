"""What the operator refuses in a spec, by class of bad value, naming the field (issue #13); and that every rule the
CRDs enforce with CEL is mirrored in meshtls.api.model, since a cluster's CRDs can be older than its operator."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtls.api.durations import format_duration
from meshtls.api.model import (
    DEFAULT_ALLOWED_DNS_NAMES,
    RESERVED_CONFIGMAP_NAMES,
    SIDECAR_CONFIG_SUFFIX,
    SpecError,
    dns_name_allowed,
    parse_trust_domain,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.api.ports import RESERVED_PORTS, SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.config import DEFAULT_ADMIN_PORT, parse_sidecar_config
from meshtls.pki import PKIError
from meshtls.pki.issue import validate_dns_name

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "e2e" / "manifests" / "hostile"
HOSTILE_TD = "hostile.e2e.test"
HOSTILE_TD_SPEC = {"certificates": {"minTTL": "1m", "defaultTTL": "1h", "maxTTL": "2h"}}  # as e2e/test_hostile.py


def wid(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "shop", "name": "web", "uid": "u"},
            "spec": {"serviceAccountName": "web", **spec}}


def td(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "cluster.local"}, "spec": spec}


def refused(parse: Any, body: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        parse(body)
    return err.value


def resolved(body: dict[str, Any], trust: dict[str, Any] | None = None) -> Any:
    return resolve_identity(parse_workload_identity(body), parse_trust_domain(trust or td()))


def refused_on_resolve(body: dict[str, Any], trust: dict[str, Any] | None = None) -> SpecError:
    with pytest.raises(SpecError) as err:
        resolved(body, trust)
    return err.value


# --- the hostile corpus through the model ------------------------------------------------------------------------


def corpus() -> list[tuple[str, dict[str, str], Any]]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        text = path.read_text().replace("__TD__", HOSTILE_TD).replace("__RUN__", "run")
        headers = {}
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            key, _, value = line[1:].strip().partition(":")
            headers[key] = value.strip()
        cases.append((path.name, headers, yaml.safe_load(text)))
    return cases


def through_the_model(doc: dict[str, Any]) -> None:
    """What the operator does with an object the API server let through: parse, and resolve against the TD."""
    if doc["kind"] == "TrustDomain":
        parse_trust_domain(doc)
        return
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": "shop"}}
    resolve_identity(parse_workload_identity(doc), parse_trust_domain({"metadata": {"name": HOSTILE_TD},
                                                                       "spec": HOSTILE_TD_SPEC}))


FIELD_CASES = [c for c in corpus() if "field" in c[1]]


@pytest.mark.parametrize(("name", "headers", "doc"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_the_model_refuses_each_corpus_case_naming_the_same_field(name: str, headers: dict[str, str],
                                                                    doc: Any) -> None:
    """Every case the API server refuses with a rule of issue #13 (`# expect:`), the model refuses too, naming the
    item (`# field:`); the cases only the operator can judge (`# expect-reason:`) carry that reason."""
    with pytest.raises(SpecError) as err:
        through_the_model(doc)
    assert err.value.field == headers["field"], (name, str(err.value))
    if "expect-reason" in headers:
        assert err.value.reason == headers["expect-reason"], (name, err.value.reason)
    api_path = headers.get("expect", "").split(":")[0]
    if re.fullmatch(r"spec\.[\w.\[\]]+", api_path):  # the API server's path is the item's or its list's
        assert err.value.field.startswith(api_path), (name, err.value.field)


def test_the_corpus_covers_every_class_of_issue_13() -> None:
    whys = " ".join(h.get("why", "") + " " + h.get("field", "") for _, h, _ in FIELD_CASES)
    for needle in ("renewBefore", "dnsNames", "address", "listenPort", "appPort", "admin", "spec.crl.validity",
                   "propagationDelay", "rotateBefore", "spec.ca.validity", "backdate", "configMapName",
                   "another namespace", "a list", "a number", "null", "string", "allowedDNSNames"):
        assert needle in whys, needle
    assert len(FIELD_CASES) >= 55


REFUSED_ELSEWHERE = {
    # the model parses only what it uses: these are pruned or bounded by the API server alone
    "t19-unknown-field.yaml": "unknown fields are pruned by the API server; the model ignores them",
    "w60-unknown-field.yaml": "unknown fields are pruned by the API server; the model ignores them",
    "w45-inbound-17.yaml": "maxItems is the API server's (request size)",
    "w51-peers-257.yaml": "maxItems is the API server's (request size)",
    "t11-federates-33.yaml": "maxItems is the API server's (request size)",
    "t12-federates-no-td.yaml": "federation references are resolved (and reported) by the trust handler",
    "t13-federates-no-namespace.yaml": "federation references are resolved (and reported) by the trust handler",
    "t08-secret-ref-no-name.yaml": "a secretRef without a name is a generated CA to the model",
    "t09-secret-ref-bad-name.yaml": "the brought CA Secret is read (and reported) by the trust handler",
    "t17-selector-list.yaml": "namespaceSelector is read by the trust handler",
    "w55-pod-selector-int.yaml": "label values are compared as strings by the webhook",
    "w63-td-ref-64-chars.yaml": "an unknown TrustDomain is reported as UnknownTrustDomain, not by the model",
}


def test_every_refused_corpus_case_is_refused_by_the_model_or_says_why_not() -> None:
    """A CRD older than the operator must not let a spec through that the operator would act on blindly."""
    through = []
    for name, headers, doc in corpus():
        if "expect" not in headers or name in REFUSED_ELSEWHERE:
            continue
        try:
            through_the_model(doc)
        except PKIError:
            continue
        through.append(name)
    assert through == [], f"the model accepts what the API server refuses: {through}"
    stale = []
    for name, _, doc in corpus():
        if name in REFUSED_ELSEWHERE:
            try:
                through_the_model(doc)
            except PKIError:
                stale.append(name)
    assert stale == [], f"refused by the model after all: drop them from REFUSED_ELSEWHERE: {stale}"


# --- item 12: a spec (or a part of it) that is not an object ------------------------------------------------------

NOT_OBJECTS = ["hello", "", 42, 0, 1.5, True, False, ["serviceAccountName", "web"], []]


@pytest.mark.parametrize("value", NOT_OBJECTS, ids=repr)
def test_a_spec_that_is_not_an_object_is_refused_naming_spec(value: Any) -> None:
    for parse in (parse_workload_identity, parse_trust_domain):
        err = refused(parse, {"metadata": {"name": "cluster.local", "namespace": "shop"}, "spec": value})
        assert err.field == "spec" and "must be an object" in err.message, err


def test_a_missing_identity_spec_is_refused_naming_spec_and_a_missing_td_spec_means_defaults() -> None:
    for body in ({"metadata": {"name": "w", "namespace": "shop"}}, {"metadata": {"name": "w"}, "spec": None}):
        assert refused(parse_workload_identity, body).field == "spec"
    assert parse_trust_domain({"metadata": {"name": "cluster.local"}, "spec": None}).name == "cluster.local"


@pytest.mark.parametrize("value", [v for v in NOT_OBJECTS if v not in ([], "", 0, False)], ids=repr)
def test_nested_parts_of_the_wrong_type_name_their_path(value: Any) -> None:
    for key in ("ca", "certificates", "bundle", "crl"):
        assert refused(parse_trust_domain, td(**{key: value})).field == f"spec.{key}"
    for key in ("inbound", "outbound", "dnsNames", "allowedPeers"):
        if not isinstance(value, list):
            assert refused(parse_workload_identity, wid(**{key: value})).field == f"spec.{key}"
    for key in ("inbound", "outbound"):
        err = refused(parse_workload_identity, wid(**{key: [value]}))
        assert err.field == f"spec.{key}[0]", err
    for key in ("ttl", "renewBefore", "serviceAccountName", "secretName"):
        if not isinstance(value, str):
            assert refused(parse_workload_identity, wid(**{key: value})).field == f"spec.{key}"


# --- item 2: the renewal point -------------------------------------------------------------------------------------

TTLS = ["10s", "1m", "20m", "1h", "90m", "24h"]


def test_renew_before_must_put_renewal_between_10_and_95_percent_of_the_lifetime() -> None:
    for ttl_text in TTLS:
        ttl = resolved(wid(ttl=ttl_text), td(certificates={"minTTL": "10s"})).ttl
        ms = ttl // dt.timedelta(milliseconds=1)
        for permille in (0, 1, 10, 49, 50, 51, 500, 899, 900, 901, 950, 999, 1000, 1500):
            renew_before = f"{ms * permille // 1000}ms"
            ok = 50 <= permille <= 900
            trust = td(certificates={"minTTL": "10s"})
            if ok:  # exact multiples of a millisecond: 5.0 % and 90.0 % are allowed, as in the CEL rule
                resolved(wid(ttl=ttl_text, renewBefore=renew_before), trust)
                resolved(wid(renewBefore=renew_before), td(certificates={"minTTL": "10s", "defaultTTL": ttl_text,
                                                                         "maxTTL": "24h"}))
                continue
            err = refused(parse_workload_identity, wid(ttl=ttl_text, renewBefore=renew_before))
            assert err.field == "spec.renewBefore" and "5-90 %" in err.message, (ttl_text, permille, err)
            # no ttl: the trust domain's default is the lifetime, checked when the identity is resolved
            err = refused_on_resolve(wid(renewBefore=renew_before),
                                     td(certificates={"minTTL": "10s", "defaultTTL": ttl_text, "maxTTL": "24h"}))
            assert err.field == "spec.renewBefore", (ttl_text, permille, err)


def test_the_issues_hot_loop_and_zero_renew_before_are_refused() -> None:
    assert refused(parse_workload_identity, wid(ttl="1h", renewBefore="59m59s")).field == "spec.renewBefore"
    assert refused_on_resolve(wid(renewBefore="0s")).field == "spec.renewBefore"  # was silently the default
    assert refused(parse_workload_identity, wid(ttl="0s")).field == "spec.ttl"  # was silently the default


@pytest.mark.parametrize("percent", [-1, 0, 5, 9, 96, 100, 1000, 66.5, "66", True, None])
def test_renew_at_percent_outside_10_to_95_is_refused(percent: Any) -> None:
    if percent is None:
        assert resolved(wid()).renew_at_fraction == pytest.approx(2 / 3)
        return
    assert refused(parse_workload_identity, wid(renewAtPercent=percent)).field == "spec.renewAtPercent"


def test_renew_at_percent_inside_the_range_is_kept() -> None:
    for percent in (10, 50, 66, 95):
        assert resolved(wid(renewAtPercent=percent)).renew_at_fraction == percent / 100


# --- item 4 and its class: TrustDomain durations ---------------------------------------------------------------

DURATION_CLASSES = ["0s", "0ms", "1ms", "999ms", "1s", "59s", "4m59s", "5m", "1h", "240h", "241h", "8760h",
                    "87600h", "87601h", "1000000h"]


def _seconds(text: str) -> float:
    return sum(int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", text))


def _outcome(spec: dict[str, Any]) -> str | None:
    try:
        parse_trust_domain(td(**spec))
    except SpecError as exc:
        return exc.field
    return None


def test_crl_validity_lies_within_5m_and_240h() -> None:
    for value in DURATION_CLASSES:
        ok = 300 <= _seconds(value) <= 240 * 3600
        assert _outcome({"crl": {"validity": value}}) == (None if ok else "spec.crl.validity"), value


def test_crl_validity_must_be_at_least_twice_the_propagation_delay() -> None:
    for crl, delay in itertools.product(["5m", "10m", "1h", "2h"], ["1s", "90s", "2m30s", "5m", "30m", "1h"]):
        ok = _seconds(crl) >= 2 * _seconds(delay)
        assert _outcome({"crl": {"validity": crl}, "ca": {"propagationDelay": delay}}) == (
            None if ok else "spec.crl.validity"), (crl, delay)


def test_propagation_delay_lies_within_1s_and_1h() -> None:
    for value in DURATION_CLASSES:
        ok = 1 <= _seconds(value) <= 3600
        expected = None if ok else "spec.ca.propagationDelay"
        assert _outcome({"ca": {"propagationDelay": value}, "crl": {"validity": "24h"}}) == expected, value


def test_ca_validity_lies_within_1h_and_10y_and_outlives_max_ttl() -> None:
    for value, max_ttl in itertools.product(DURATION_CLASSES, ["30m", "24h", "8784h"]):
        ok = 3600 <= _seconds(value) <= 87600 * 3600 and _seconds(value) > _seconds(max_ttl)
        spec = {"ca": {"validity": value}, "certificates": {"maxTTL": max_ttl, "defaultTTL": "10m"}}
        assert _outcome(spec) == (None if ok else "spec.ca.validity"), (value, max_ttl)
    # a brought CA's validity is its certificate's: checked when it is loaded, not here
    assert _outcome({"ca": {"secretRef": {"name": "team-ca"}, "rotateBefore": "3h"}}) is None


def test_rotate_before_exceeds_the_propagation_delay_and_stays_under_90_percent_of_the_validity() -> None:
    for rotate, validity in itertools.product(["0s", "1m", "90s", "91s", "1h", "9h", "10h", "11h", "20h"],
                                              ["10h", "8760h"]):
        seconds = _seconds(rotate)
        ok = seconds > 90 and seconds * 100 <= _seconds(validity) * 90
        spec = {"ca": {"validity": validity, "rotateBefore": rotate}, "certificates": {"maxTTL": "1h"}}
        assert _outcome(spec) == (None if ok else "spec.ca.rotateBefore"), (rotate, validity)


def test_backdate_is_at_most_an_hour_and_capped_at_a_quarter_of_the_ttl() -> None:
    for value in ("0s", "1s", "60s", "1h", "61m", "2h"):
        ok = _seconds(value) <= 3600
        assert _outcome({"certificates": {"backdate": value}}) == (None if ok else "spec.certificates.backdate")
    short = resolved(wid(ttl="20s"), td(certificates={"minTTL": "10s", "backdate": "1h"}))
    assert short.backdate == dt.timedelta(seconds=5)


@pytest.mark.parametrize("value", ["-1m", "1d", "1.5h", "an hour", 90, "", "1h "])
def test_badly_written_durations_name_their_field(value: Any) -> None:
    for spec, field in (({"crl": {"validity": value}}, "spec.crl.validity"),
                        ({"ca": {"propagationDelay": value}}, "spec.ca.propagationDelay"),
                        ({"ca": {"rotateBefore": value}}, "spec.ca.rotateBefore"),
                        ({"ca": {"validity": value}}, "spec.ca.validity"),
                        ({"certificates": {"backdate": value}}, "spec.certificates.backdate")):
        assert _outcome(spec) == field, (value, field)


# --- item 5: bundle names someone else writes -----------------------------------------------------------------------


def test_bundle_configmap_names_someone_else_writes_are_refused() -> None:
    reserved = [*RESERVED_CONFIGMAP_NAMES, "kube-proxy", "kube-root-ca.crt", "kube-anything",
                f"web{SIDECAR_CONFIG_SUFFIX}", f"x{SIDECAR_CONFIG_SUFFIX}"]
    for name in reserved:
        assert _outcome({"bundle": {"configMapName": name}}) == "spec.bundle.configMapName", name
    for name in ("meshtls-bundle", "trust-bundle", "kubernetes-ca", "my.bundle", "meshtls-proxy"):
        assert _outcome({"bundle": {"configMapName": name}}) is None, name


# --- item 8: IP literals ------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 255), min_size=1, max_size=4), st.booleans())
@settings(max_examples=200, deadline=None)
def test_ip_literals_are_refused_in_dns_names(octets: list[int], wildcard: bool) -> None:
    name = ("*." if wildcard and len(octets) > 1 else "") + ".".join(map(str, octets[-3:] if wildcard else octets))
    with pytest.raises(PKIError) as err:
        validate_dns_name(name, "spec.dnsNames[0]")
    assert err.value.field == "spec.dnsNames[0]"
    err2 = refused(parse_workload_identity, wid(dnsNames=["web", name]))
    assert err2.field == "spec.dnsNames[1]" and "IP address" in err2.message


def test_hex_and_decimal_ip_forms_are_refused_and_names_with_digits_are_not() -> None:
    for name in ("167772161", "0x7f000001", "0x7f.1", "web.0x1", "a.b.10"):
        assert refused(parse_workload_identity, wid(dnsNames=[name])).field == "spec.dnsNames[0]", name
    for name in ("web1", "10x.shop", "web.shop.svc", "x1.y2", "0xab.com", "v6.shop"):
        validate_dns_name(name)


# --- item 9 and the sidecar config as a whole: ports ------------------------------------------------------------

BAD_PORTS = [0, -1, 65536, 99999, 10**9, True, "8080", 80.0, None]


def _inbound(port: Any, app: Any) -> dict[str, Any]:
    return {"port": port, "appPort": app}


def _outbound(listen: Any, address: str = "api.shop.svc:443") -> dict[str, Any]:
    return {"listenPort": listen, "address": address, "peer": "spiffe://cluster.local/ns/a/sa/b"}


@pytest.mark.parametrize("port", BAD_PORTS, ids=repr)
def test_ports_outside_1_to_65535_are_refused_everywhere(port: Any) -> None:
    cases = [({"inbound": [_inbound(8443, 8080), _inbound(port, 8081)]}, "spec.inbound[1].port"),
             ({"inbound": [_inbound(8443, port)]}, "spec.inbound[0].appPort"),
             ({"outbound": [_outbound(15001), _outbound(port)]}, "spec.outbound[1].listenPort"),
             ({"outbound": [_outbound(15001, f"x.svc:{port}")]}, "spec.outbound[0].address")]
    for spec, field in cases:
        if field.endswith("address") and port in (True, 80.0, None, "8080"):
            continue  # only integers have a textual port form that could mean something else
        assert refused(parse_workload_identity, wid(**spec)).field == field, (spec, field)


def test_address_ports_are_checked_as_numbers_not_only_as_digits() -> None:
    for port in ("1", "443", "65535"):
        parse_workload_identity(wid(outbound=[_outbound(15001, f"db.shop.svc:{port}")]))
    for address in ("db:0", "db:00443", "db:65536", "db:99999", "db:", ":443", "db", "db:44a", "db:443:1",
                    "d b:443", "db:-1"):
        assert refused(parse_workload_identity, wid(outbound=[_outbound(15001, address)])).field == \
            "spec.outbound[0].address", address


def _listeners(spec: dict[str, Any]) -> list[tuple[str, int]]:
    """Every (field, port) something listens on in the pod, meshtls's reserved ports included (not the appPorts)."""
    out = [("admin", SIDECAR_ADMIN_PORT), ("workload API admin", WORKLOAD_API_ADMIN_PORT)]
    out += [(f"spec.inbound[{i}].port", r["port"]) for i, r in enumerate(spec.get("inbound", []))]
    out += [(f"spec.outbound[{i}].listenPort", r["listenPort"]) for i, r in enumerate(spec.get("outbound", []))]
    return out


@given(st.lists(st.tuples(st.sampled_from([8080, 8443, 9443, 15001, SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT]),
                          st.sampled_from([8080, 8081, 9443, 15001, SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT])),
                max_size=3),
       st.lists(st.sampled_from([8080, 8443, 15001, 15002, SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT]), max_size=3))
@settings(max_examples=400, deadline=None)
def test_port_collisions_across_inbound_outbound_and_admin_are_refused_naming_the_item(
    inbound: list[tuple[int, int]], outbound: list[int],
) -> None:
    spec = {"inbound": [_inbound(p, a) for p, a in inbound], "outbound": [_outbound(lp) for lp in outbound]}
    listeners = _listeners(spec)
    ports = [p for _, p in listeners]
    collide = len(set(ports)) != len(ports) or any(a in ports for _, a in inbound)
    if not collide:
        identity = parse_workload_identity(wid(**spec))
        assert [r.port for r in identity.inbound] == [p for p, _ in inbound]
        return
    err = refused(parse_workload_identity, wid(**spec))
    assert re.fullmatch(r"spec\.(inbound\[\d\]\.(port|appPort)|outbound\[\d\]\.listenPort)", err.field), err
    # the named item really is one of the colliding ones
    index = int(err.field.split("[")[1][0])
    item = spec[err.field.split(".")[1].split("[")[0]][index]
    value = item[err.field.rsplit(".", 1)[1]]
    others = [p for f, p in listeners if f != err.field] + [a for i, (_, a) in enumerate(inbound)
                                                             if f"spec.inbound[{i}].appPort" != err.field]
    assert value in others, (err, spec)
    assert str(value) in err.message


def test_the_model_and_the_sidecar_agree_on_the_admin_port() -> None:
    assert SIDECAR_ADMIN_PORT == DEFAULT_ADMIN_PORT
    crd = yaml.safe_load((REPO / "crds" / "workloadidentities.meshtls.dev.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for port in RESERVED_PORTS:  # refused by CEL on each of the three port fields, naming that field
        for key, field in (("inbound", "port"), ("inbound", "appPort"), ("outbound", "listenPort")):
            rules = spec[key]["items"]["x-kubernetes-validations"]
            assert {"rule": f"self.{field} != {port}", "fieldPath": f".{field}"} in [
                {k: r[k] for k in ("rule", "fieldPath") if k in r} for r in rules], (port, key, field)


# Every port field of a WorkloadIdentity and of the sidecar config it renders to, against each reserved port.
PORT_FIELDS = [
    ({"inbound": [_inbound("P", 8080)]}, "inbound[0].port"),
    ({"inbound": [_inbound(8443, "P")]}, "inbound[0].appPort"),
    ({"outbound": [_outbound("P")]}, "outbound[0].listenPort"),
    ({"inbound": [_inbound(8443, 8080), _inbound("P", 8080)]}, "inbound[1].port"),
    ({"inbound": [_inbound(8443, 8080), _inbound(9443, "P")]}, "inbound[1].appPort"),
    ({"inbound": [_inbound(8443, 8080)], "outbound": [_outbound(15001), _outbound("P")]}, "outbound[1].listenPort"),
]


def _put(value: Any, port: int) -> Any:
    if isinstance(value, dict):
        return {k: _put(v, port) for k, v in value.items()}
    if isinstance(value, list):
        return [_put(v, port) for v in value]
    return port if value == "P" else value


@pytest.mark.parametrize("port", list(RESERVED_PORTS), ids=str)
@pytest.mark.parametrize(("template", "field"), PORT_FIELDS, ids=[f for _, f in PORT_FIELDS])
def test_every_port_field_on_a_reserved_port_is_refused_naming_it(template: dict[str, Any], field: str,
                                                                  port: int) -> None:
    """Whatever the data plane and workloadAPI say (the CRD cannot know them, and both may change later)."""
    spec = _put(template, port)
    for extra in ({}, {"dataPlane": "envoy"}, {"dataPlane": "envoy", "workloadAPI": {"enabled": True}},
                  {"dataPlane": "meshtls-proxy", "workloadAPI": {"enabled": False}}):
        err = refused(parse_workload_identity, wid(**spec, **extra))
        assert err.field == f"spec.{field}", (extra, err)
        assert str(port) in err.message and RESERVED_PORTS[port] in err.message, err
    with pytest.raises(PKIError) as info:
        parse_sidecar_config({"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", **spec})
    assert info.value.field == field and str(port) in info.value.message, info.value
    # the same spec one port over is fine: the refusal is about the reserved port, not the shape
    parse_workload_identity(wid(**_put(template, 15095)))
    parse_sidecar_config({"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", **_put(template, 15095)})


def test_the_sidecar_config_moves_the_admin_port_but_never_onto_the_workload_api_containers() -> None:
    base = {"spiffeId": "spiffe://cluster.local/ns/shop/sa/web", "inbound": [_inbound(8443, 8080)]}
    with pytest.raises(PKIError) as info:
        parse_sidecar_config({**base, "admin": {"port": WORKLOAD_API_ADMIN_PORT}})
    assert info.value.field == "admin.port" and RESERVED_PORTS[WORKLOAD_API_ADMIN_PORT] in info.value.message
    moved = parse_sidecar_config({**base, "admin": {"port": 40000}})
    assert moved.admin_port == 40000
    with pytest.raises(PKIError) as info:  # the moved admin port is the one taken now
        parse_sidecar_config({**base, "admin": {"port": 40000}, "outbound": [_outbound(40000)]})
    assert info.value.field == "outbound[0].listenPort" and "admin.port" in info.value.message


def test_the_sidecar_refuses_the_same_collisions_in_its_config() -> None:
    base = {"spiffeId": "spiffe://cluster.local/ns/shop/sa/web"}
    for spec in ({"inbound": [_inbound(8443, 8080)], "outbound": [_outbound(8080)]},
                 {"inbound": [_inbound(8443, 9443), _inbound(9443, 8080)]},
                 {"inbound": [_inbound(8443, DEFAULT_ADMIN_PORT)]}):
        with pytest.raises(PKIError):
            parse_sidecar_config({**base, **spec})
        with pytest.raises(SpecError):
            parse_workload_identity(wid(**spec))


def test_a_name_too_long_for_the_sidecar_configmap_is_refused_whichever_field_gives_it_a_sidecar() -> None:
    """<name>-meshtls-proxy cut to 253 characters could be another identity's ConfigMap: a name too long for it is
    refused when the identity has a sidecar, be it for its routes, its own workloadAPI or its TrustDomain's default
    (which the model sees only when the identity is resolved)."""
    long = "w" * (253 - len(SIDECAR_CONFIG_SUFFIX) + 1)
    fits = long[:-1]
    td_on = td(workloadAPI={"enabled": True})
    body = {"metadata": {"namespace": "shop", "name": long, "uid": "u"},
            "spec": {"serviceAccountName": "web", "secretName": "web-mtls"}}
    for spec, trust in (({"inbound": [_inbound(8443, 8080)]}, td()), ({"workloadAPI": {"enabled": True}}, td()),
                        ({}, td_on), ({"workloadAPI": None}, td_on)):
        err = refused_on_resolve({**body, "spec": {**body["spec"], **spec}}, trust)
        assert (err.field, err.reason) == ("metadata.name", "InvalidSpec"), (spec, err)
    for spec, trust in (({}, td()), ({"workloadAPI": {"enabled": False}}, td_on)):  # no sidecar: no ConfigMap
        assert not resolved({**body, "spec": {**body["spec"], **spec}}, trust).has_sidecar
    resolved({**body, "metadata": {**body["metadata"], "name": fits}}, td_on)


# --- the namespace is the isolation boundary for DNS names -----------------------------------------------------

OWN = ["web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local", "*.shop", "*.shop.svc",
       "*.shop.svc.cluster.local", "web-0.web.shop.svc.cluster.local", "*.web.shop.svc", "web-0.web.shop.svc"]
FOREIGN = ["web.kube-system", "web.default.svc", "web.default.svc.cluster.local", "*.svc.cluster.local", "*.svc",
           "*.cluster.local", "*.default.svc", "db-0.db.default.svc.cluster.local", "api.example.com",
           "shop.svc", "web.shop.svc.cluster.other", "x.y.shop", "web.shop.svc.cluster.local.evil.com",
           "www.example.shop"]


def test_default_policy_allows_the_namespaces_own_service_names_only() -> None:
    for name in OWN:
        assert dns_name_allowed(name, "shop", DEFAULT_ALLOWED_DNS_NAMES), name
        resolved(wid(dnsNames=[name]))
    for name in FOREIGN:
        assert not dns_name_allowed(name, "shop", DEFAULT_ALLOWED_DNS_NAMES), name
        err = refused_on_resolve(wid(dnsNames=["web", name]))
        assert (err.field, err.reason) == ("spec.dnsNames[1]", "DNSNameNotAllowed"), name
        assert "*.shop" in err.message and "allowedDNSNames" in err.message


def test_one_namespaces_names_are_foreign_in_every_other() -> None:
    namespaces = ["shop", "default", "kube-system", "svc", "a"]
    for own, other in itertools.permutations(namespaces, 2):
        for form in ("web.{}", "web.{}.svc", "web.{}.svc.cluster.local", "*.{}.svc"):
            name = form.format(other)
            if own == "svc" and name.endswith(".svc") and form == "web.{}":
                continue  # "web.svc" is <svc>.<own namespace> when the namespace is called svc
            assert not dns_name_allowed(name, own, DEFAULT_ALLOWED_DNS_NAMES), (own, name)
            assert dns_name_allowed(form.format(own), own, DEFAULT_ALLOWED_DNS_NAMES), (own, form)


def test_a_trust_domain_policy_allows_names_explicitly_and_replaces_the_default() -> None:
    policy = td(certificates={"allowedDNSNames": ["**.example.com", "api.$(namespace).corp", "*.$(namespace).svc"]})
    for name in ("api.example.com", "a.b.example.com", "*.example.com", "api.shop.corp", "web.shop.svc"):
        resolved(wid(dnsNames=[name]), policy)
    for name in ("example.com", "api.other.corp", "web", "web.shop.svc.cluster.local", "api.example.com.evil"):
        err = refused_on_resolve(wid(dnsNames=[name]), policy)
        assert err.reason == "DNSNameNotAllowed" and "api.shop.corp" in err.message, name
    closed = td(certificates={"allowedDNSNames": []})
    assert "no DNS names" in refused_on_resolve(wid(dnsNames=["web"]), closed).message
    assert resolved(wid(), closed).spec.dns_names == ()
    anything = td(certificates={"allowedDNSNames": ["**"]})
    resolved(wid(dnsNames=["web.kube-system.svc", "api.example.com"]), anything)


@pytest.mark.parametrize("pattern", ["a.**", "**.**", "*a.com", "A.com", "$(ns).svc", "a..b", "", "-a.com", 42,
                                     "x" * 254])
def test_bad_dns_patterns_are_refused_naming_the_item(pattern: Any) -> None:
    spec = {"certificates": {"allowedDNSNames": ["*.$(namespace).svc", pattern]}}
    assert _outcome(spec) == "spec.certificates.allowedDNSNames[1]", pattern


def test_the_crd_holds_the_models_defaults_and_names() -> None:
    crd = (REPO / "crds" / "trustdomains.meshtls.dev.yaml").read_text()
    for name in RESERVED_CONFIGMAP_NAMES:
        assert f"'{name}'" in crd, name
    for pattern in DEFAULT_ALLOWED_DNS_NAMES:
        assert pattern in crd, pattern
    for bound in ("duration('5m')", "duration('240h')", "duration('1s')", "duration('1h')", "duration('87600h')",
                  "* 90", "'90s'", "'8760h'", "'24h'"):
        assert bound in crd, bound
    assert format_duration(dt.timedelta(hours=240)) == "10d"
