"""The finalizer set at admission: every class of review in, the patch (or none) out; never a denial."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from meshtls.api.constants import FINALIZER
from meshtls.injection.identity_admission import finalizer_patch, review_identity_admission
from meshtls.injection.webhook import webhook_definitions
from meshtls.operator.settings import OperatorOptions

IDENTITY_KIND = {"group": "meshtls.dev", "version": "v1alpha1", "kind": "WorkloadIdentity"}


def review(obj: Any, operation: str = "CREATE", kind: dict[str, str] | None = None, **extra: Any) -> bytes:
    request = {"uid": "u-1", "kind": kind or IDENTITY_KIND, "operation": operation, "namespace": "ns",
               "object": obj, **extra}
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).encode()


def identity(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": "web", "namespace": "ns", **meta}, "spec": {"serviceAccountName": "web"}}


def applied(body: bytes) -> dict[str, Any]:
    """The object as the API server stores it after applying the response's patch."""
    outcome = review_identity_admission(body)
    assert outcome.http_status == 200
    response = outcome.response["response"]
    assert response["allowed"] is True and response["uid"] == "u-1"
    obj = json.loads(body)["request"]["object"]
    if "patch" not in response:
        return dict(obj)
    assert response["patchType"] == "JSONPatch"
    return apply_adds(obj, json.loads(base64.b64decode(response["patch"])))


def apply_adds(obj: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 "add" as the API server applies it (the only op the webhook sends); fails on any other."""
    for op in patch:
        assert op["op"] == "add", op
        *parents, last = op["path"].lstrip("/").split("/")
        target: Any = obj
        for part in parents:
            target = target[part]
        if isinstance(target, list):
            assert last == "-", op
            target.append(op["value"])
        else:
            target[last] = op["value"]
    return obj


@pytest.mark.parametrize("meta", [{}, {"finalizers": []}, {"finalizers": None}, {"finalizers": ["other.io/keep"]},
                                  {"finalizers": ["a/x", "b/y"]}])
def test_a_created_identity_gets_the_finalizer_and_keeps_any_other(meta: dict[str, Any]) -> None:
    before = list(meta.get("finalizers") or [])
    after = applied(review(identity(**meta)))
    assert after["metadata"]["finalizers"] == [*before, FINALIZER]
    assert after["spec"] == {"serviceAccountName": "web"}  # nothing else touched


def test_an_identity_that_has_it_already_is_not_patched() -> None:
    outcome = review_identity_admission(review(identity(finalizers=["x/y", FINALIZER])))
    assert "patch" not in outcome.response["response"] and outcome.response["response"]["allowed"] is True
    assert finalizer_patch(identity(finalizers=[FINALIZER])) == []


@pytest.mark.parametrize(("operation", "kind", "extra"), [
    ("UPDATE", IDENTITY_KIND, {}),
    ("DELETE", IDENTITY_KIND, {}),
    ("CREATE", IDENTITY_KIND, {"subResource": "status"}),
    ("CREATE", {"group": "", "version": "v1", "kind": "Pod"}, {}),
    ("CREATE", {"group": "meshtls.dev", "version": "v1alpha1", "kind": "TrustDomain"}, {}),
    ("CREATE", {"group": "other.io", "version": "v1", "kind": "WorkloadIdentity"}, {}),
])
def test_anything_but_an_identity_create_is_allowed_unchanged(operation: str, kind: dict[str, str],
                                                              extra: dict[str, Any]) -> None:
    outcome = review_identity_admission(review(identity(), operation, kind, **extra))
    assert outcome.http_status == 200
    assert outcome.response["response"] == {"uid": "u-1", "allowed": True, "warnings": []}


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"kind": "AdmissionReview"}',
                                  json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                              "request": {"kind": IDENTITY_KIND}}).encode(),
                                  b"x" * (4 * 1024 * 1024)])
def test_a_malformed_review_gets_a_400_saying_why_never_a_denial_of_a_good_one(body: bytes) -> None:
    outcome = review_identity_admission(body)
    assert outcome.http_status == 400
    assert "bad admission request" in outcome.response["response"]["status"]["message"]


@pytest.mark.parametrize("obj", [None, "text", {"metadata": "x"}])
def test_an_object_of_the_wrong_shape_is_allowed_and_left_to_the_api_servers_validation(obj: Any) -> None:
    outcome = review_identity_admission(review(obj))
    assert outcome.http_status == 200 and outcome.response["response"]["allowed"] is True


@pytest.mark.parametrize(("policy", "namespaces"), [("Fail", []), ("Ignore", ["b", "a", "b"])])
def test_the_finalizer_webhook_is_always_ignore_and_scoped_to_the_namespaces_served(policy: str,
                                                                                    namespaces: list[str]) -> None:
    hooks = webhook_definitions(OperatorOptions(webhook_port=9443, webhook_failure_policy=policy,
                                                namespaces=namespaces), b"ca")
    pods = [h for h in hooks if h["rules"][0]["resources"] == ["pods"]]
    identities = [h for h in hooks if h["rules"][0]["resources"] == ["workloadidentities"]]
    assert len(pods) == 2 and {h["failurePolicy"] for h in pods} == {policy}
    assert len(identities) == 1
    hook = identities[0]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["rules"][0]["operations"] == ["CREATE"] and hook["rules"][0]["apiGroups"] == ["meshtls.dev"]
    assert hook["clientConfig"]["url"].endswith(":9443/finalize")
    if namespaces:
        assert hook["namespaceSelector"] == {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]}
    else:
        assert hook["namespaceSelector"] == {}
