"""Specs the operator refuses itself (beyond what the API server's schema refuses), naming the field."""

from __future__ import annotations

import datetime as dt

import pytest

from meshtls.api.durations import format_duration, parse_duration
from meshtls.api.model import SpecError, parse_trust_domain, parse_workload_identity, resolve_identity
from meshtls.pki import PKIError


def wid(**spec: object) -> dict[str, object]:
    return {"metadata": {"namespace": "shop", "name": "web", "uid": "u"}, "spec": {"serviceAccountName": "web", **spec}}


def td(**spec: object) -> dict[str, object]:
    return {"metadata": {"name": "cluster.local"}, "spec": spec}


def test_defaults() -> None:
    identity = resolve_identity(parse_workload_identity(wid()), parse_trust_domain(td()))
    assert str(identity.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/web"
    assert identity.ttl == dt.timedelta(hours=1)
    assert identity.key_algorithm.value == "ecdsa-p256"
    assert identity.spec.secret_name == "web-mtls"
    assert abs(identity.renew_at_fraction - 2 / 3) < 1e-9


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (wid(serviceAccountName=""), "spec.serviceAccountName"),
        (wid(serviceAccountName="Web"), "spec.serviceAccountName"),
        (wid(serviceAccountName="a/b"), "spec.serviceAccountName"),
        (wid(dnsNames=["UPPER.case"]), "spec.dnsNames[0]"),
        (wid(ttl="an hour"), "spec.ttl"),
        (wid(keyAlgorithm="dsa"), "spec.keyAlgorithm"),
        (wid(renewAtPercent=99), "spec.renewAtPercent"),
        (wid(allowedPeers=["http://x"]), "spec.allowedPeers[0]"),
        (wid(trustDomain="Bad.Domain"), "spec.trustDomain"),
    ],
)
def test_bad_identity_specs_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_workload_identity(body)
    assert err.value.field == field


def test_ttl_outside_the_trust_domains_range() -> None:
    with pytest.raises(SpecError) as err:
        resolve_identity(parse_workload_identity(wid(ttl="1m")), parse_trust_domain(td()))
    assert err.value.field == "spec.ttl" and err.value.reason == "TTLOutOfRange" and "5m-1d" in err.value.message
    short = parse_trust_domain(td(certificates={"minTTL": "10s", "defaultTTL": "20s"}))
    assert resolve_identity(parse_workload_identity(wid()), short).ttl == dt.timedelta(seconds=20)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"certificates": {"minTTL": "1s"}}, "spec.certificates.minTTL"),
        ({"certificates": {"minTTL": "2h", "maxTTL": "1h"}}, "spec.certificates.minTTL"),
        ({"certificates": {"defaultTTL": "48h"}}, "spec.certificates.defaultTTL"),
        ({"ca": {"keyAlgorithm": "rsa-1024"}}, "spec.ca.keyAlgorithm"),
    ],
)
def test_bad_trust_domain_specs_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_trust_domain(td(**spec))
    assert err.value.field == field


def test_durations() -> None:
    assert parse_duration("1h30m", "x") == dt.timedelta(minutes=90)
    assert parse_duration("20s", "x") == dt.timedelta(seconds=20)
    assert format_duration(dt.timedelta(minutes=90)) == "1h30m"
    for bad in ("", "1", "h", "1y", "-1h", "1.5h"):
        with pytest.raises(PKIError):
            parse_duration(bad, "x")


def test_names_that_would_make_invalid_objects_are_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as err:
        parse_trust_domain({"metadata": {"name": "a" * 64}, "spec": {}})
    assert err.value.field == "metadata.name" and "63" in err.value.message
    long_name = "w" * 250
    with pytest.raises(SpecError) as err:
        parse_workload_identity({"metadata": {"namespace": "shop", "name": long_name}, "spec": {
            "serviceAccountName": "web"}})
    assert err.value.field == "spec.secretName"
    assert parse_workload_identity({"metadata": {"namespace": "shop", "name": long_name}, "spec": {
        "serviceAccountName": "web", "secretName": "short"}}).secret_name == "short"
    with pytest.raises(SpecError) as err:
        parse_workload_identity({"metadata": {"namespace": "shop", "name": "x" * 245}, "spec": {
            "serviceAccountName": "web", "secretName": "short", "inbound": [{"port": 1, "appPort": 2}]}})
    assert err.value.field == "metadata.name"


def test_a_replica_stands_by_only_for_a_live_peer_with_a_higher_priority() -> None:
    from meshtls.policy.peering import outranked_by_live_peer

    now = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
    fresh, stale = (now - dt.timedelta(seconds=5)).isoformat(), (now - dt.timedelta(seconds=90)).isoformat()
    assert outranked_by_live_peer({"a": {"priority": 200, "lifetime": 60, "lastseen": fresh}}, 100, now)
    assert not outranked_by_live_peer({"a": {"priority": 200, "lifetime": 60, "lastseen": stale}}, 100, now)
    assert not outranked_by_live_peer({"me": {"priority": 100, "lifetime": 60, "lastseen": fresh}}, 100, now)
    assert not outranked_by_live_peer({"a": {"priority": 50, "lifetime": 60, "lastseen": fresh}}, 100, now)
    assert not outranked_by_live_peer({"junk": "x", "b": {"priority": "high"}}, 100, now)
