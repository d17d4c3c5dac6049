"""Which data plane an identity's pods get (identity > TrustDomain > operator default), its validation in the model
and the CRDs, what the operator writes into the sidecar ConfigMap for each, and the Envoy-only refusals reported as
a field-named condition with one Warning. No cluster: the controller runs against testsupport.fakekube."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from testsupport.fakekube import FakeKube

from meshtls.api.model import (
    DEFAULT_DATA_PLANE,
    DataPlane,
    SpecError,
    choose_data_plane,
    parse_trust_domain,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.api.reasons import Reason
from meshtls.cli.main import build_parser
from meshtls.controller.identity import on_identity_event
from meshtls.controller.runtime import Operator
from meshtls.controller.trust.registry import TrustDomains
from meshtls.dataplane.envoy import ENVOY_FILES, render_envoy_files
from meshtls.dataplane.layout import CONFIG_FILE
from meshtls.injection.render import (
    CONFIGMAP_DATA_LIMIT,
    check_publishable,
    render_sidecar_config,
    render_sidecar_files,
    spec_field,
)
from meshtls.operator.settings import OperatorOptions
from meshtls.policy.clock import FakeClock

ROOT = Path(__file__).resolve().parents[1]
CHOICES: list[DataPlane | None] = [None, *DataPlane]
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def wid(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"namespace": "shop", "name": "web"},
            "spec": {"serviceAccountName": "web", "inbound": [{"port": 8443, "appPort": 8080}], **spec}}


def td(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "TrustDomain",
            "metadata": {"name": "cluster.local", "annotations": {}}, "spec": spec}


# --- the decision -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("identity", "trust_domain", "operator_default"),
                         list(itertools.product(CHOICES, CHOICES, list(DataPlane))))
def test_the_identity_wins_then_the_trust_domain_then_the_operator(
        identity: DataPlane | None, trust_domain: DataPlane | None, operator_default: DataPlane) -> None:
    expected = identity if identity is not None else trust_domain if trust_domain is not None else operator_default
    assert choose_data_plane(identity, trust_domain, operator_default) is expected
    # the same through the parsed resources and resolve_identity
    wid_spec = {} if identity is None else {"dataPlane": identity.value}
    td_spec = {} if trust_domain is None else {"sidecar": {"dataPlane": trust_domain.value}}
    resolved = resolve_identity(parse_workload_identity(wid(**wid_spec)), parse_trust_domain(td(**td_spec)),
                                operator_default)
    assert resolved.data_plane is expected


def test_the_chart_defaults_to_envoy_and_the_bare_operator_to_meshtls_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart installs Envoy as the default data plane: the data-plane bench's reference run chose it (it wins on
    CPU per GiB and on handshakes per CPU-s within its memory goal, docs/benchmarks.md section 4). `meshtls operator`
    run without the chart (and without --default-data-plane) keeps meshtls-proxy: a pip install has Envoy only with
    the `envoy` extra. The model's default, the CLI's and the operator options' agree."""
    values = yaml.safe_load((ROOT / "charts/meshtls/values.yaml").read_text())
    assert values["dataPlane"] == DataPlane.ENVOY.value
    statefulset = (ROOT / "charts/meshtls/templates/statefulset.yaml").read_text()
    assert "--default-data-plane={{ .Values.dataPlane }}" in statefulset
    reference = json.loads((ROOT / "bench/results/reference/dataplane/results.json").read_text())
    assert reference["dataplane"]["default_data_plane"]["choice"] == values["dataPlane"], \
        reference["dataplane"]["default_data_plane"]

    assert DEFAULT_DATA_PLANE is DataPlane.MESHTLS_PROXY
    assert resolve_identity(parse_workload_identity(wid()), parse_trust_domain(td())).data_plane is DEFAULT_DATA_PLANE
    assert OperatorOptions().default_data_plane == DEFAULT_DATA_PLANE.value
    monkeypatch.delenv("MESHTLS_DEFAULT_DATA_PLANE", raising=False)
    assert build_parser().parse_args(["operator"]).default_data_plane == DEFAULT_DATA_PLANE.value
    monkeypatch.setenv("MESHTLS_DEFAULT_DATA_PLANE", "envoy")
    assert build_parser().parse_args(["operator"]).default_data_plane == "envoy"


@pytest.mark.parametrize("value", ["Envoy", "istio", "", " envoy", 1, True, ["envoy"], {"name": "envoy"}])
@pytest.mark.parametrize("where", ["identity", "trust domain"])
def test_an_unknown_data_plane_is_refused_naming_the_field_and_the_choices(value: Any, where: str) -> None:
    with pytest.raises(SpecError) as caught:
        if where == "identity":
            parse_workload_identity(wid(dataPlane=value))
        else:
            parse_trust_domain(td(sidecar={"dataPlane": value}))
    assert caught.value.field == ("spec.dataPlane" if where == "identity" else "spec.sidecar.dataPlane")
    assert "meshtls-proxy, envoy" in caught.value.message


def test_a_trust_domain_sidecar_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        parse_trust_domain(td(sidecar="envoy"))
    assert caught.value.field == "spec.sidecar"


def crd_schema(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "crds" / name).read_text())
    return doc["spec"]["versions"][0]


def test_the_crds_offer_the_same_choices_and_show_the_data_plane() -> None:
    choices = [d.value for d in DataPlane]
    identity = crd_schema("workloadidentities.meshtls.dev.yaml")
    spec = identity["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["dataPlane"]["enum"] == choices
    assert identity["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["dataPlane"] == \
        {"type": "string"}
    assert {"name": "DataPlane", "jsonPath": ".status.dataPlane"}.items() <= next(
        c for c in identity["additionalPrinterColumns"] if c["name"] == "DataPlane").items()
    trust = crd_schema("trustdomains.meshtls.dev.yaml")
    sidecar = trust["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sidecar"]
    assert sidecar["properties"]["dataPlane"]["enum"] == choices


# --- what the ConfigMap carries -----------------------------------------------------------------------------------


def effective(plane: DataPlane, **spec: Any) -> Any:
    return resolve_identity(parse_workload_identity(wid(dataPlane=plane.value, **spec)), parse_trust_domain(td()))


SHAPES = [
    {},
    {"allowedPeers": ["spiffe://cluster.local/ns/shop/sa/a", "spiffe://cluster.local/ns/ops/*"]},
    {"inbound": [], "outbound": [{"listenPort": 15001, "address": "api.shop.svc:443",
                                  "peer": "spiffe://cluster.local/ns/shop/sa/api"}]},
    {"allowedPeers": ["*"], "outbound": [{"listenPort": 15001, "address": "10.0.0.7:8443",
                                          "peer": "spiffe://cluster.local/ns/db/*"}]},
]


@pytest.mark.parametrize("spec", SHAPES)
@pytest.mark.parametrize("plane", list(DataPlane))
def test_the_configmap_has_proxy_yaml_always_and_envoys_files_for_envoy(plane: DataPlane,
                                                                         spec: dict[str, Any]) -> None:
    identity = effective(plane, **spec)
    files = render_sidecar_files(identity)
    config = render_sidecar_config(identity)
    assert files[CONFIG_FILE] == config.to_yaml()  # a meshtls-proxy pod of this identity keeps reading it
    if plane is DataPlane.ENVOY:
        assert set(files) == {CONFIG_FILE, *ENVOY_FILES}
        assert {k: files[k] for k in ENVOY_FILES} == render_envoy_files(config)
    else:
        assert set(files) == {CONFIG_FILE}


@pytest.mark.parametrize(("address", "field"), [("a..b:443", "spec.outbound[0].address"),
                                                ("-api.shop:443", "spec.outbound[0].address"),
                                                (f"{'x' * 64}.shop:443", "spec.outbound[0].address")])
def test_an_address_only_envoy_cannot_use_is_refused_for_envoy_only(address: str, field: str) -> None:
    """The CRD's address pattern lets these through; meshtls-proxy tries them at connect time, Envoy would not
    start: refused at render time with the spec's field, so no Envoy is ever handed them."""
    spec = {"outbound": [{"listenPort": 15001, "address": address, "peer": "spiffe://cluster.local/ns/a/sa/b"}]}
    assert CONFIG_FILE in render_sidecar_files(effective(DataPlane.MESHTLS_PROXY, **spec))
    with pytest.raises(SpecError) as caught:
        render_sidecar_files(effective(DataPlane.ENVOY, **spec))
    assert caught.value.field == field and caught.value.reason == Reason.INVALID_SPEC
    assert "Envoy" in caught.value.message and address in caught.value.message


@pytest.mark.parametrize(("config_field", "spec"), [
    ("outbound[3].address", "spec.outbound[3].address"), ("inbound[0].port", "spec.inbound[0].port"),
    ("inbound[2].allow[7]", "spec.allowedPeers[7]"), ("inbound[1].allow", "spec.allowedPeers"),
    ("identityDir", "spec"), ("admin.port", "spec"), ("configDir", "spec")])
def test_sidecar_config_fields_map_to_the_spec_fields_they_came_from(config_field: str, spec: str) -> None:
    assert spec_field(config_field) == spec


def long_peer(i: int) -> str:
    prefix = f"spiffe://cluster.local/ns/shop/sa/p{i}-"
    return prefix + "x" * (2048 - len(prefix))


@pytest.mark.parametrize("peers", [40, 90, 200])
def test_the_size_check_counts_envoys_files_too(peers: int) -> None:
    """Envoy's bootstrap repeats the allow-list per inbound listener: the same spec may fit for meshtls-proxy and
    not for Envoy. The check agrees with the bytes the API server would count, for both."""
    spec = {"allowedPeers": [long_peer(i) for i in range(peers)],
            "inbound": [{"port": 8443 + i, "appPort": 9000 + i} for i in range(4)]}
    for plane in DataPlane:
        identity = effective(plane, **spec)
        files = render_sidecar_files(identity)
        size = sum(len(k.encode()) + len(v.encode()) for k, v in files.items())
        if size <= CONFIGMAP_DATA_LIMIT:
            check_publishable(identity, files)
            continue
        with pytest.raises(SpecError) as caught:
            check_publishable(identity, files)
        assert caught.value.reason == Reason.SIDECAR_CONFIG_TOO_LARGE and caught.value.field == "spec.allowedPeers"
        assert plane.value in caught.value.message


def test_the_size_check_can_refuse_envoy_alone() -> None:
    spec = {"allowedPeers": [long_peer(i) for i in range(90)],
            "inbound": [{"port": 8443 + i, "appPort": 9000 + i} for i in range(4)]}
    check_publishable(effective(DataPlane.MESHTLS_PROXY, **spec),
                      render_sidecar_files(effective(DataPlane.MESHTLS_PROXY, **spec)))
    envoy = effective(DataPlane.ENVOY, **spec)
    with pytest.raises(SpecError, match=r"envoy\.yaml"):
        check_publishable(envoy, render_sidecar_files(envoy))


# --- the controller: ConfigMap, status.dataPlane, refusals reported once ----------------------------------------


def world(td_spec: dict[str, Any] | None = None,
          default: DataPlane = DataPlane.MESHTLS_PROXY) -> tuple[FakeKube, FakeClock, Operator]:
    kube, clock = FakeKube(), FakeClock(T0)
    kube.trust_domains["cluster.local"] = td(**(td_spec or {}))
    op = Operator(kube, clock, TrustDomains(kube, clock, "meshtls-system"),  # type: ignore[arg-type]
                  default_data_plane=default)
    return kube, clock, op


async def apply(op: Operator, kube: FakeKube, body: dict[str, Any], event: str = "ADDED") -> dict[str, Any]:
    """kubectl apply of the spec (status and identity kept, a new generation when the spec changed), then the
    event the operator's watch gets."""
    current = kube.get_workload_identity("shop", "web")
    if current is not None:
        changed = current["spec"] != body["spec"]
        meta = {**current["metadata"], "generation": current["metadata"]["generation"] + changed}
        body = {**body, "metadata": meta, "status": current.get("status") or {}}
    kube.put_identity(copy.deepcopy(body))
    await on_identity_event(op, event, kube.get_workload_identity("shop", "web") or {})
    return kube.get_workload_identity("shop", "web") or {}


@pytest.mark.parametrize(("td_plane", "default"), list(itertools.product([None, *DataPlane], list(DataPlane))))
def test_the_operator_writes_the_chosen_data_planes_files_and_reports_it(td_plane: DataPlane | None,
                                                                          default: DataPlane) -> None:
    kube, _, op = world({"sidecar": {"dataPlane": td_plane.value}} if td_plane else {}, default)
    expected = td_plane or default

    async def scenario() -> None:
        stored = await apply(op, kube, wid())
        # the first issuance's one status write carries the data plane (issue #16: no write of its own)
        assert kube.count("patch_workload_identity_status") == 1
        data = kube.configmaps[("shop", "web-meshtls-proxy")]["data"]
        assert set(data) == ({CONFIG_FILE, *ENVOY_FILES} if expected is DataPlane.ENVOY else {CONFIG_FILE})
        assert stored["status"]["dataPlane"] == expected.value
        assert op.targets.lookup("shop", "web")[0].data_plane == expected.value
        # the identity overrides: switched, the files follow (the Envoy ones go when it leaves Envoy)
        other = next(d for d in DataPlane if d is not expected)
        stored = await apply(op, kube, wid(dataPlane=other.value), "MODIFIED")
        data = kube.configmaps[("shop", "web-meshtls-proxy")]["data"]
        assert set(data) == ({CONFIG_FILE, *ENVOY_FILES} if other is DataPlane.ENVOY else {CONFIG_FILE})
        assert stored["status"]["dataPlane"] == other.value
        assert op.targets.lookup("shop", "web")[0].data_plane == other.value
        patches = kube.count("patch_workload_identity_status")
        await apply(op, kube, wid(dataPlane=other.value), "MODIFIED")  # nothing changed: no status write for it
        assert kube.count("patch_workload_identity_status") == patches
        # routes gone: no sidecar, no data plane shown
        stored = await apply(op, kube, wid(dataPlane=other.value, inbound=[]), "MODIFIED")
        assert stored["status"].get("dataPlane") is None and op.targets.lookup("shop", "web") == []

    asyncio.run(scenario())


def test_a_spec_envoy_cannot_run_is_a_field_named_condition_and_one_warning() -> None:
    kube, clock, op = world(default=DataPlane.ENVOY)
    bad = wid(inbound=[], outbound=[{"listenPort": 15001, "address": "a..b:443",
                                     "peer": "spiffe://cluster.local/ns/a/sa/b"}])

    async def scenario() -> None:
        stored = await apply(op, kube, bad)
        ready = next(c for c in stored["status"]["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", Reason.INVALID_SPEC)
        assert "spec.outbound[0].address" in ready["message"] and "Envoy" in ready["message"]
        assert kube.reasons("web", "Warning") == [Reason.INVALID_SPEC]
        assert ("shop", "web-meshtls-proxy") not in kube.configmaps  # no Envoy is ever handed it
        assert op.targets.lookup("shop", "web") == []
        for _ in range(3):  # retries find the same: no new Event
            clock.advance(dt.timedelta(seconds=61))
            await apply(op, kube, bad, "MODIFIED")
        assert kube.reasons("web", "Warning") == [Reason.INVALID_SPEC]
        # the same spec on meshtls-proxy is published
        stored = await apply(op, kube, {**bad, "spec": {**bad["spec"], "dataPlane": "meshtls-proxy"}}, "MODIFIED")
        assert set(kube.configmaps[("shop", "web-meshtls-proxy")]["data"]) == {CONFIG_FILE}

    asyncio.run(scenario())
