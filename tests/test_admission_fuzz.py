"""review_pod_admission against hostile input: property-based fuzzing (hypothesis) plus the edge cases by name.

Whatever the bytes, it must not raise, must answer 200 or 400, and a 200 must echo the uid and be one of: allowed
unchanged, allowed with a JSON Patch that applies cleanly to the pod (and leaves a pod a second review won't touch),
or a denial with a message.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshtls.api.constants import ANNOTATION_INJECTED, LABEL_INJECT_POD
from meshtls.api.reasons import Reason
from meshtls.injection.admission import (
    AdmissionOutcome,
    Lookup,
    review_pod_admission,
)
from meshtls.injection.target import SIDECAR_NAME, VOLUME_BUNDLE, VOLUME_IDENTITY, InjectionOptions, InjectionTarget
from test_inject_golden import admission_review, apply_json_patch, patch_of

# MESHTLS_FUZZ_EXAMPLES=5000 for a deeper run; the default keeps the file well under 30 s
FUZZ = settings(max_examples=int(os.environ.get("MESHTLS_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UID = "7f0c1b1e-0000-4000-8000-000000000001"
SERVICE_ACCOUNTS = ["backend", "frontend", "default"]


def target(name: str, service_account: str, selector: dict[str, str] | None = None) -> InjectionTarget:
    return InjectionTarget(identity_name=name, service_account=service_account,
                           spiffe_id=f"spiffe://demo.meshtls.local/ns/shop/sa/{service_account}",
                           secret_name=f"{name}-mtls", config_map=f"{name}-meshtls-proxy",
                           bundle_config_map="meshtls-bundle", pod_selector=selector or {}, inbound_ports=(8443,))


def lookup_all(namespace: str, service_account: str) -> list[InjectionTarget]:
    """The identity of the asked ServiceAccount, plus other ServiceAccounts' (which must be ignored)."""
    assert isinstance(namespace, str) and namespace
    assert isinstance(service_account, str) and service_account
    return [target(f"id-{service_account}", service_account), *(target(f"id-{sa}", sa) for sa in SERVICE_ACCOUNTS)]


def check(outcome: AdmissionOutcome, body: bytes) -> None:
    """The contract, for any body."""
    assert outcome.http_status in (200, 400)
    json.dumps(outcome.response)  # serializable as is
    assert outcome.response["apiVersion"] == "admission.k8s.io/v1"
    assert outcome.response["kind"] == "AdmissionReview"
    response = outcome.response["response"]
    assert isinstance(response["allowed"], bool)
    if outcome.http_status == 400:
        assert response["allowed"] is False and response["status"]["message"]
        assert outcome.event is None
        return
    request = json.loads(body)["request"]
    assert response["uid"] == request["uid"]
    if not response["allowed"]:
        assert isinstance(response["status"]["message"], str) and response["status"]["message"].startswith("meshtls:")
        assert "patch" not in response
        return
    assert all(isinstance(w, str) and len(w) <= 256 and w.isprintable() for w in response["warnings"])
    if outcome.event is not None:
        reason, message = outcome.event
        assert reason in (Reason.IDENTITY_NOT_FOUND, Reason.IDENTITY_AMBIGUOUS) and message
    if "patch" not in response:
        return
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    patched = apply_json_patch(request["object"], patch)  # raises if it does not apply cleanly
    containers = [*(patched["spec"].get("initContainers") or []), *(patched["spec"].get("containers") or [])]
    assert [c["name"] for c in containers].count(SIDECAR_NAME) == 1
    before = request["object"]["spec"].get("volumes") or []
    after = patched["spec"]["volumes"]
    assert after[: len(before)] == before, "the pod's own volumes changed"
    added = [v["name"] for v in after[len(before):]]
    assert len(set(added)) == 3 and not set(added) & {v["name"] for v in before}, "a volume name was clobbered"
    again = review_pod_admission(admission_review(patched, request.get("namespace") or "shop"), lookup_all,
                                 InjectionOptions())
    assert again.http_status == 200 and patch_of(again) == []


def review(body: bytes, max_body: int = 3 * 1024 * 1024, lookup: Lookup = lookup_all,
           options: InjectionOptions = InjectionOptions()) -> AdmissionOutcome:
    outcome = review_pod_admission(body, lookup, options, max_body=max_body)
    check(outcome, body)
    return outcome


# --- strategies -------------------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
names = st.sampled_from(["app", "sidecar", SIDECAR_NAME, "init", "x" * 63]) | st.text(min_size=1, max_size=10)


def maybe_wrong(good: st.SearchStrategy[Any], odds: int = 3) -> st.SearchStrategy[Any]:
    """Usually the right shape (`odds` to 1), sometimes anything at all."""
    return st.integers(0, odds).flatmap(lambda i: json_values if i == odds else good)


def lists_of(item: st.SearchStrategy[Any], max_size: int) -> st.SearchStrategy[Any]:
    """Long lists of good items, or short ones where any item may be wrong."""
    return st.lists(item, max_size=max_size) | st.lists(maybe_wrong(item), max_size=3)


ports = lists_of(st.fixed_dictionaries({"containerPort": st.sampled_from([8080, 8443, 15090])}), 3)
container = st.fixed_dictionaries({"name": maybe_wrong(names, odds=12)},
                                  optional={"image": st.just("img"), "ports": maybe_wrong(ports)})
volume: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"name": maybe_wrong(st.sampled_from([VOLUME_IDENTITY, f"{VOLUME_IDENTITY}-1", VOLUME_BUNDLE, "meshtls-config",
                                          "data"]), odds=12)},
    optional={"emptyDir": st.just({})})
label_maps = st.dictionaries(st.sampled_from(["app", "tier", LABEL_INJECT_POD]),
                             st.sampled_from(["backend", "api", "true", "false", "FALSE"]), max_size=3)
annotation_maps = st.dictionaries(st.sampled_from(["a", ANNOTATION_INJECTED, "meshtls.dev/spiffe-id", "x/y~z"]),
                                  st.text(max_size=10), max_size=3)
metadata = st.fixed_dictionaries({}, optional={
    "name": maybe_wrong(st.just("backend")), "generateName": st.just("backend-"),
    "namespace": maybe_wrong(st.just("shop")), "labels": maybe_wrong(label_maps, odds=6),
    "annotations": maybe_wrong(annotation_maps | st.none(), odds=6),
})
specs = st.fixed_dictionaries({"containers": maybe_wrong(lists_of(container, 50), odds=8)}, optional={
    "initContainers": maybe_wrong(lists_of(container, 5) | st.none(), odds=8),
    "volumes": maybe_wrong(lists_of(volume, 6) | st.none(), odds=8),
    "serviceAccountName": maybe_wrong(st.sampled_from([*SERVICE_ACCOUNTS, ""]), odds=8),
    "serviceAccount": maybe_wrong(st.sampled_from(SERVICE_ACCOUNTS)),
    "hostNetwork": maybe_wrong(st.booleans()),
    "restartPolicy": st.sampled_from(["Always", "Never", "OnFailure"]),
    "securityContext": maybe_wrong(st.fixed_dictionaries({}, optional={"fsGroup": maybe_wrong(st.integers(0, 9))})),
})
pods = maybe_wrong(st.fixed_dictionaries({"apiVersion": st.just("v1"), "kind": st.just("Pod"),
                                          "spec": maybe_wrong(specs, odds=12)},
                                         optional={"metadata": maybe_wrong(metadata, odds=12)}), odds=12)


# --- properties -------------------------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(body: bytes) -> None:
    assert review(body).http_status == 400


@FUZZ
@given(json_values)
def test_random_json(value: Any) -> None:
    review(json.dumps(value).encode())


@FUZZ
@given(st.binary(min_size=1, max_size=2000), st.integers(0, 1999))
def test_oversized_bodies_are_400(body: bytes, max_body: int) -> None:
    outcome = review(body, max_body=max_body)
    if len(body) > max_body:
        assert outcome.http_status == 400 and "limit" in outcome.response["response"]["status"]["message"]


@FUZZ
@given(st.fixed_dictionaries({}, optional={
    "apiVersion": maybe_wrong(st.just("admission.k8s.io/v1")),
    "kind": maybe_wrong(st.just("AdmissionReview")),
    "request": maybe_wrong(st.fixed_dictionaries({}, optional={
        "uid": maybe_wrong(st.just(UID)),
        "kind": maybe_wrong(st.fixed_dictionaries({"group": maybe_wrong(st.just("")), "version": st.just("v1"),
                                                   "kind": maybe_wrong(st.sampled_from(["Pod", "Deployment"]))})),
        "resource": maybe_wrong(st.just({"group": "", "version": "v1", "resource": "pods"})),
        "subResource": st.sampled_from(["", "status", "ephemeralcontainers"]),
        "operation": maybe_wrong(st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"])),
        "namespace": maybe_wrong(st.sampled_from(["shop", ""])),
        "dryRun": maybe_wrong(st.booleans()),
        "object": pods,
    })),
}))
def test_odd_reviews(review_doc: dict[str, Any]) -> None:
    outcome = review(json.dumps(review_doc).encode())
    request = review_doc.get("request")
    well_formed = (review_doc.get("apiVersion") == "admission.k8s.io/v1" and review_doc.get("kind") == "AdmissionReview"
                   and isinstance(request, dict) and isinstance(request.get("uid"), str) and request["uid"] != "")
    assert outcome.http_status == (200 if well_formed else 400)


LOOKUPS: dict[str, Lookup] = {
    "one": lookup_all,
    "none": lambda namespace, service_account: [],
    "other": lambda namespace, service_account: [target("id-x", service_account + "-x")],
    "two": lambda namespace, service_account: [target("a", service_account), target("b", service_account)],
    "selector": lambda namespace, service_account: [target("a", service_account, {"app": "backend"}),
                                                    target("b", service_account, {"tier": "api"})],
}


@FUZZ
@given(pods, st.sampled_from(["shop", None]), st.sampled_from(sorted(LOOKUPS)), st.booleans())
def test_odd_pods(pod: Any, namespace: str | None, lookup: str, native: bool) -> None:
    outcome = review(admission_review(pod, namespace), lookup=LOOKUPS[lookup],
                     options=InjectionOptions(native_sidecar=native))
    assert outcome.http_status == 200
    if lookup in ("none", "other", "two"):
        assert "patch" not in outcome.response["response"]


@FUZZ
@given(st.integers(0, 50), st.booleans(), st.booleans(), st.sampled_from(SERVICE_ACCOUNTS))
def test_well_formed_pods_get_injected(n: int, host_network: bool, clash: bool, service_account: str) -> None:
    pod = {"metadata": {"generateName": "backend-", "labels": {"app": "backend"}},
           "spec": {"serviceAccountName": service_account, "hostNetwork": host_network,
                    "containers": [{"name": f"c{i}", "ports": [{"containerPort": 8000 + i}]} for i in range(n + 1)],
                    **({"volumes": [{"name": VOLUME_IDENTITY, "emptyDir": {}}]} if clash else {})}}
    outcome = review(admission_review(pod))
    response = outcome.response["response"]
    assert response["allowed"] and "patch" in response
    assert any("hostNetwork" in w for w in response["warnings"]) == host_network


# --- the edge cases by name -------------------------------------------------------------------------------------

POD: dict[str, Any] = {"metadata": {"name": "backend", "labels": {"app": "backend"}},
       "spec": {"serviceAccountName": "backend", "containers": [{"name": "app"}]}}


def test_injects_only_the_service_accounts_identity() -> None:
    outcome = review(admission_review(POD))
    patch = patch_of(outcome)
    patched = apply_json_patch(POD, patch)
    assert patched["metadata"]["annotations"][ANNOTATION_INJECTED] == "id-backend"
    assert patched["spec"]["volumes"][0]["secret"]["secretName"] == "id-backend-mtls"


def test_never_another_service_accounts_identity() -> None:
    def wrong(namespace: str, service_account: str) -> list[InjectionTarget]:
        return [target("id-frontend", "frontend"), target("admin", "cluster-admin")]

    outcome = review_pod_admission(admission_review(POD), wrong, InjectionOptions())
    assert patch_of(outcome) == [] and outcome.response["response"]["allowed"]
    assert outcome.event == (Reason.IDENTITY_NOT_FOUND, "meshtls: no WorkloadIdentity in shop for ServiceAccount "
                                                        "backend; pod admitted without a sidecar")


def test_duplicates_from_the_lookup_are_not_ambiguous() -> None:
    same = target("id-backend", "backend")
    outcome = review_pod_admission(admission_review(POD), lambda *_: [same, same], InjectionOptions())
    assert patch_of(outcome) != []


def test_ambiguity_names_the_identities() -> None:
    many = [target(f"id-{i}", "backend") for i in range(8)]
    outcome = review_pod_admission(admission_review(POD), lambda *_: many, InjectionOptions())
    assert outcome.event is not None and outcome.event[0] == Reason.IDENTITY_AMBIGUOUS
    assert "id-0, id-1, id-2, id-3, id-4 and 3 more" in outcome.event[1]
    assert patch_of(outcome) == []


@pytest.mark.parametrize("value", ["false", "False", " FALSE "])
def test_opted_out(value: str) -> None:
    pod = {**POD, "metadata": {"labels": {LABEL_INJECT_POD: value}}}
    outcome = review(admission_review(pod))
    assert outcome.response["response"] == {"uid": UID, "allowed": True, "warnings": []}
    assert outcome.event is None


def test_generate_name_pod_and_namespace_from_the_pod() -> None:
    pod = {"metadata": {"generateName": "backend-", "namespace": "shop"}, "spec": POD["spec"]}
    seen: list[tuple[str, str]] = []

    def lookup(namespace: str, service_account: str) -> list[InjectionTarget]:
        seen.append((namespace, service_account))
        return [target("id-backend", "backend")]

    outcome = review_pod_admission(admission_review(pod, namespace=None), lookup, InjectionOptions())
    assert seen == [("shop", "backend")] and patch_of(outcome) != []


def test_dry_run_posts_no_event() -> None:
    body = admission_review(POD, dryRun=True)
    outcome = review_pod_admission(body, lambda *_: [], InjectionOptions())
    assert outcome.response["response"]["warnings"] and outcome.event is None


@pytest.mark.parametrize("changes", [
    {"operation": "UPDATE"}, {"operation": "DELETE"}, {"subResource": "ephemeralcontainers"},
    {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    {"kind": {"group": "example.com", "version": "v1", "kind": "Pod"}},
])
def test_not_a_pod_create_is_allowed_unchanged(changes: dict[str, Any]) -> None:
    outcome = review(admission_review(POD, **changes))
    assert outcome.response["response"] == {"uid": UID, "allowed": True, "warnings": []}


@pytest.mark.parametrize("body, why", [
    (b"", "not valid JSON"), (b"{", "not valid JSON"), (b"[" * 100_000, "not valid JSON"),
    (b"\xff\xfe\x00", "not valid JSON"), (b"1" * 5000, "not valid JSON"), (b"[]", "not a JSON object"),
    (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}}',
     "expected kind AdmissionReview"),
    (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request is missing"),
    (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}', "request.uid"),
])
def test_bad_requests_are_400_with_a_reason(body: bytes, why: str) -> None:
    outcome = review(body)
    assert outcome.http_status == 400 and why in outcome.response["response"]["status"]["message"]


def test_oversized_default_limit() -> None:
    body = admission_review({**POD, "padding": "x" * (3 * 1024 * 1024)})
    outcome = review(body)
    assert outcome.http_status == 400 and "limit" in outcome.response["response"]["status"]["message"]


@pytest.mark.parametrize("pod, field", [
    ({**POD, "spec": {**POD["spec"], "containers": "app"}}, "spec.containers"),
    ({**POD, "spec": {**POD["spec"], "volumes": {"name": "v"}}}, "spec.volumes"),
    ({**POD, "metadata": {"labels": ["app", "backend"]}}, "metadata.labels"),
    ({**POD, "spec": {**POD["spec"], "serviceAccountName": 7}}, "spec.serviceAccountName"),
    ({"metadata": {}}, "spec"),
    ("a pod", "request.object"),
])
def test_wrong_types_are_denied_naming_the_field(pod: Any, field: str) -> None:
    outcome = review(admission_review(pod))
    response = outcome.response["response"]
    assert outcome.http_status == 200 and response["allowed"] is False
    assert response["status"]["code"] == 400 and field in response["status"]["message"]


def test_missing_namespace_is_denied() -> None:
    outcome = review(admission_review(POD, namespace=None))
    assert outcome.response["response"]["allowed"] is False
    assert "namespace" in outcome.response["response"]["status"]["message"]


def test_a_failing_lookup_is_a_denial_not_an_exception() -> None:
    def broken(namespace: str, service_account: str) -> list[InjectionTarget]:
        raise RuntimeError("index not ready")

    outcome = review_pod_admission(admission_review(POD), broken, InjectionOptions())
    response = outcome.response["response"]
    assert outcome.http_status == 200 and response["uid"] == UID and response["allowed"] is False
    assert response["status"]["code"] == 500 and "index not ready" in response["status"]["message"]


def test_hostile_names_are_printable_in_warnings() -> None:
    pod = {**POD, "spec": {**POD["spec"], "serviceAccountName": "evil\nname\x1b[31m" + "y" * 400}}
    outcome = review_pod_admission(admission_review(pod), lambda *_: [], InjectionOptions())
    (warning,) = outcome.response["response"]["warnings"]
    assert warning.isprintable() and len(warning) <= 256
    assert outcome.event is not None and outcome.event[1].isprintable()
