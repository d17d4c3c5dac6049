"""The webhook's API fallback (a standing-by or just-started replica) builds the same targets the acting replica
puts in its index: both parse through meshtls.api.model and call injection.render.injection_target."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from meshtls.api.model import (
    DataPlane,
    TrustDomainSpec,
    parse_trust_domain,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.injection.render import injection_target
from meshtls.injection.target import InjectionOptions, InjectionTarget
from meshtls.injection.targets import TargetIndex
from meshtls.injection.webhook import InjectionWebhook
from meshtls.operator.settings import OperatorOptions

NAMESPACE = "shop"


class ListingKube:
    """The two reads the fallback makes, answered from dicts."""

    def __init__(self, identities: list[dict[str, Any]], trust_domains: dict[str, dict[str, Any]]) -> None:
        self.identities = identities
        self.trust_domains = trust_domains

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def list_workload_identities(self, namespace: str) -> list[dict[str, Any]]:
        return [b for b in self.identities if b["metadata"]["namespace"] == namespace]

    def get_trust_domain(self, name: str) -> dict[str, Any] | None:
        return self.trust_domains.get(name)


def identity(name: str, sa: str, *, ready: bool = True, secret_name: str | None = None, inbound: bool = True,
             outbound: bool = False, selector: dict[str, str] | None = None, td: str = "example.org",
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"serviceAccountName": sa, "trustDomain": td}
    if secret_name:
        spec["secretName"] = secret_name
    if inbound:
        spec["inbound"] = [{"port": 8443, "appPort": 8080}]
    if outbound:
        spec["outbound"] = [{"listenPort": 9001, "address": "db.shop:5432", "peer": "spiffe://example.org/ns/x/sa/y"}]
    if selector:
        spec["podSelector"] = {"matchLabels": selector}
    spec.update(extra or {})
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec,
            "status": {"trustDomain": td, "spiffeID": f"spiffe://{td}/ns/{NAMESPACE}/sa/{sa}",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def trust_domain(name: str, bundle: str | None) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"bundle": {"configMapName": bundle}} if bundle else {}}


def as_the_acting_replica_indexes(body: dict[str, Any], td: TrustDomainSpec) -> InjectionTarget:
    return injection_target(resolve_identity(parse_workload_identity(body), td), td.bundle_configmap)


def fallback(kube: ListingKube, sa: str) -> list[InjectionTarget]:
    webhook = InjectionWebhook(kube, TargetIndex(), OperatorOptions(), InjectionOptions())  # type: ignore[arg-type]
    return asyncio.run(webhook._targets_from_api(NAMESPACE, sa))


def test_the_fallback_target_is_the_indexed_target_for_every_shape() -> None:
    shapes = itertools.product([None, "custom-secret"], [True, False], [False, True], [None, {"app": "web"}],
                               [None, "shop-bundle"])
    for secret_name, inbound, outbound, selector, bundle in shapes:
        if not (inbound or outbound):
            continue
        body = identity("web", "web", secret_name=secret_name, inbound=inbound, outbound=outbound, selector=selector)
        td_body = trust_domain("example.org", bundle)
        got = fallback(ListingKube([body], {"example.org": td_body}), "web")
        assert got == [as_the_acting_replica_indexes(body, parse_trust_domain(td_body))], (secret_name, bundle)


def test_only_ready_sidecar_identities_of_the_service_account_are_targets() -> None:
    wanted = identity("web", "web")
    others = [identity("not-ready", "web", ready=False), identity("other-sa", "api"),
              identity("no-routes", "web", inbound=False, outbound=False)]
    kube = ListingKube([*others, wanted], {"example.org": trust_domain("example.org", None)})
    assert [t.identity_name for t in fallback(kube, "web")] == ["web"]


def test_a_malformed_neighbour_does_not_hide_the_valid_identity() -> None:
    """One identity's spec the model refuses is skipped; the others are still found (not the whole lookup lost)."""
    bad_specs = [{"inbound": [{"port": "https", "appPort": 8080}]}, {"inbound": [{"port": 70000, "appPort": 1}]},
                 {"inbound": "8443"}, {"podSelector": {"matchLabels": "app=web"}}]
    for bad in bad_specs:
        kube = ListingKube([identity("broken", "web", extra=bad), identity("web", "web")],
                           {"example.org": trust_domain("example.org", "shop-bundle")})
        assert [t.identity_name for t in fallback(kube, "web")] == ["web"], bad


def test_a_deleted_trust_domain_falls_back_to_its_defaults() -> None:
    body = identity("web", "web")
    got = fallback(ListingKube([body], {}), "web")
    assert got == [as_the_acting_replica_indexes(body, TrustDomainSpec(name="example.org"))]
    assert got[0].bundle_config_map == "meshtls-bundle"


def test_the_fallback_injects_the_data_plane_the_acting_replica_would() -> None:
    """Identity > TrustDomain > the operator's default, the same through the API fallback as through the index."""
    choices: list[str | None] = [None, "meshtls-proxy", "envoy"]
    for own, td_default, operator_default in itertools.product(choices, choices, ["meshtls-proxy", "envoy"]):
        body = identity("web", "web", extra={"dataPlane": own} if own else {})
        td_body = trust_domain("example.org", None)
        if td_default:
            td_body["spec"]["sidecar"] = {"dataPlane": td_default}
        options = OperatorOptions(default_data_plane=operator_default)
        webhook = InjectionWebhook(ListingKube([body], {"example.org": td_body}),  # type: ignore[arg-type]
                                   TargetIndex(), options, InjectionOptions())
        got = asyncio.run(webhook._targets_from_api(NAMESPACE, "web"))
        assert [t.data_plane for t in got] == [own or td_default or operator_default], (own, td_default)
        indexed = injection_target(resolve_identity(parse_workload_identity(body), parse_trust_domain(td_body),
                                                    DataPlane(operator_default)), "meshtls-bundle")
        assert got == [indexed]
