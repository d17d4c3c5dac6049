"""spec.workloadAPI on WorkloadIdentity and TrustDomain: the default, the override both ways, bad values named."""

from __future__ import annotations

from typing import Any

import pytest

from meshtls.api.model import SpecError, parse_trust_domain, parse_workload_identity, resolve_identity
from meshtls.injection.render import injection_target


def identity(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "shop"}, "spec": {"serviceAccountName": "web", **spec}}


def trust_domain(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "td.test"}, "spec": spec}


@pytest.mark.parametrize(("td", "own", "effective"), [
    ({}, {}, False),  # off by default
    ({"workloadAPI": {"enabled": True}}, {}, True),  # the trust domain's default
    ({"workloadAPI": {"enabled": True}}, {"workloadAPI": {"enabled": False}}, False),  # the identity opts out
    ({}, {"workloadAPI": {"enabled": True}}, True),  # the identity opts in
    ({"workloadAPI": {}}, {"workloadAPI": {}}, False),  # enabled absent in both: the default
])
def test_the_identity_wins_over_its_trust_domain(td: dict[str, Any], own: dict[str, Any], effective: bool) -> None:
    resolved = resolve_identity(parse_workload_identity(identity(own)), parse_trust_domain(trust_domain(td)))
    assert resolved.workload_api is effective
    assert injection_target(resolved, "meshtls-bundle").workload_api is effective
    # no routes: the sidecar is there for the Workload API alone, or not at all
    assert resolved.has_sidecar is effective


@pytest.mark.parametrize(("value", "field"), [
    ("yes", "spec.workloadAPI"),
    (True, "spec.workloadAPI"),
    ({"enabled": "true"}, "spec.workloadAPI.enabled"),
    ({"enabled": 1}, "spec.workloadAPI.enabled"),
    ({"enabled": True, "socket": "/tmp/x"}, "spec.workloadAPI.socket"),
])
def test_bad_values_name_the_field(value: object, field: str) -> None:
    for parse, body in ((parse_workload_identity, identity({"workloadAPI": value})),
                        (parse_trust_domain, trust_domain({"workloadAPI": value}))):
        with pytest.raises(SpecError) as err:
            parse(body)
        assert err.value.field == field


def test_a_long_name_is_refused_once_the_workload_api_needs_a_sidecar_config() -> None:
    name = "w" * 240
    body = {"metadata": {"name": name, "namespace": "shop"},
            "spec": {"serviceAccountName": "web", "workloadAPI": {"enabled": True}}}
    with pytest.raises(SpecError) as err:
        parse_workload_identity(body)
    assert err.value.field == "metadata.name"
    body["spec"]["workloadAPI"] = {"enabled": False}
    assert parse_workload_identity(body).workload_api is False


def test_turning_the_trust_domains_default_on_offers_its_identities_to_the_injector_at_once() -> None:
    from meshtls.controller.trust_domains import reconcile_trust_domain
    from test_controller_identity import create, identity, run, run_due, world

    kube, _clock, op = world()

    async def scenario() -> None:
        await reconcile_trust_domain(op, kube.trust_domains["a.example"])
        await create(op, kube, identity("web"))  # no routes: no sidecar yet
        assert op.targets.lookup("shop", "web") == []
        kube.trust_domains["a.example"]["spec"]["workloadAPI"] = {"enabled": True}
        await reconcile_trust_domain(op, kube.trust_domains["a.example"])
        await run_due(op)  # the identity's reconcile, scheduled now
        (target,) = op.targets.lookup("shop", "web")
        assert target.workload_api and ("shop", "web-meshtls-proxy") in kube.configmaps
        kube.trust_domains["a.example"]["spec"]["workloadAPI"] = {"enabled": False}
        await reconcile_trust_domain(op, kube.trust_domains["a.example"])
        await run_due(op)
        assert op.targets.lookup("shop", "web") == []

    run(scenario())
