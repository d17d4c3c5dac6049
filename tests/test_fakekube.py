"""The shared fake API (testsupport.fakekube) keeps the API server's promises the controller relies on: a test
against it is only as honest as these."""

from __future__ import annotations

import pytest
from testsupport.fakekube import FakeKube, merge_patch

from meshtls.api.constants import LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.objects import ABSENT
from meshtls.kube.client import ApiError, Conflict, NotFound


def secret_body(name: str, value: str = "v") -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {LABEL_MANAGED_BY: MANAGED_BY},
                         "ownerReferences": [{"uid": "owner"}]}, "stringData": {"k": value}}


def test_secrets_create_once_and_replace_only_from_the_latest_read() -> None:
    kube = FakeKube()
    assert kube.read_secret("ns", "s") is ABSENT
    kube.write_secret(secret_body("s"), ABSENT)
    with pytest.raises(Conflict):  # a create over an existing object: 409 AlreadyExists
        kube.write_secret(secret_body("s"), ABSENT)
    first = kube.read_secret("ns", "s")
    assert first.data == {"k": b"v"} and first.owned_by("owner")
    kube.write_secret(secret_body("s", "w"), first)
    second = kube.read_secret("ns", "s")
    assert second.resource_version != first.resource_version and second.uid == first.uid
    with pytest.raises(Conflict):  # replace from a stale read: 409 Conflict
        kube.write_secret(secret_body("s", "x"), first)
    with pytest.raises(Conflict):  # a delete naming another object's uid: precondition failed
        kube.delete_secret("ns", "s", "someone-else")
    kube.delete_secret("ns", "s", str(second.uid))
    kube.delete_secret("ns", "s", str(second.uid))  # 404 on delete is success
    with pytest.raises(NotFound):  # replace of a deleted object
        kube.write_secret(secret_body("s"), second)
    assert kube.count("write_secret") == 5 and kube.count("delete_secret", "ns", "s") == 3


def test_configmaps_have_the_same_guards() -> None:
    kube = FakeKube()
    kube.write_configmap("ns", "c", {"a": "1"}, {}, None)
    with pytest.raises(Conflict):
        kube.write_configmap("ns", "c", {"a": "2"}, {}, None)
    current = kube.read_configmap("ns", "c")
    assert current is not None
    kube.write_configmap("ns", "c", {"a": "2"}, {}, current)
    with pytest.raises(Conflict):
        kube.write_configmap("ns", "c", {"a": "3"}, {}, current)
    with pytest.raises(Conflict):
        kube.delete_configmap("ns", "c", "other-uid")
    kube.delete_configmap("ns", "c", current["uid"])
    assert kube.read_configmap("ns", "c") is None


def test_identities_patch_merge_and_finalizers_hold_a_deletion() -> None:
    kube = FakeKube()
    with pytest.raises(NotFound):
        kube.patch_workload_identity_status("ns", "w", {"a": 1})
    kube.put_identity({"metadata": {"namespace": "ns", "name": "w"}, "spec": {}})
    body = kube.get_workload_identity("ns", "w")
    assert body is not None
    with pytest.raises(ApiError) as stale:  # JSON-patch test on resourceVersion fails: 422
        kube.add_workload_identity_finalizer("ns", "w", "f", [], "not-the-version")
    assert stale.value.status == 422
    kube.add_workload_identity_finalizer("ns", "w", "f", [], body["metadata"]["resourceVersion"])
    kube.patch_workload_identity_status("ns", "w", {"a": 1, "conditions": [{"type": "Ready"}]})
    kube.patch_workload_identity_status("ns", "w", {"b": 2, "conditions": []})
    status = (kube.get_workload_identity("ns", "w") or {})["status"]
    assert status == {"a": 1, "b": 2, "conditions": []}  # objects merge, lists replace
    marked = kube.delete_identity("ns", "w")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    assert kube.get_workload_identity("ns", "w") is not None  # held by the finalizer
    kube.remove_workload_identity_finalizer("ns", "w", "f", ["f"])
    assert kube.get_workload_identity("ns", "w") is None  # the last finalizer gone: deleted
    kube.remove_workload_identity_finalizer("ns", "w", "f", ["f"])  # 404: nothing to do


def test_merge_patch_deletes_with_none_and_copies_values() -> None:
    nested = {"x": [1]}
    out = merge_patch({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"c": None}, "d": None, "e": nested})
    assert out == {"a": {"b": 1}, "e": {"x": [1]}}
    nested["x"].append(2)
    assert out["e"] == {"x": [1]}


def test_queued_failures_are_raised_once_each() -> None:
    kube = FakeKube()
    kube.failures["read_secret"] = [ApiError(500, "InternalError", "boom")]
    with pytest.raises(ApiError):
        kube.read_secret("ns", "s")
    assert kube.read_secret("ns", "s") is ABSENT


def test_a_terminating_namespace_takes_no_new_objects_but_updates_and_deletes() -> None:
    kube = FakeKube()
    kube.write_configmap("ns", "c", {"a": "1"}, {}, None)
    kube.terminating.add("ns")
    for create in (lambda: kube.write_secret(secret_body("s"), ABSENT),
                   lambda: kube.write_configmap("ns", "d", {}, {}, None),
                   lambda: kube.post_event({"namespace": "ns", "name": "x"}, "Normal", "R", "m")):
        with pytest.raises(ApiError) as refused:
            create()
        assert refused.value.status == 403 and "being terminated" in str(refused.value)
    kube.write_configmap("ns", "c", {"a": "2"}, {}, kube.read_configmap("ns", "c"))
    kube.delete_configmap("ns", "c", None)
    assert not kube.namespace_exists("ns") and kube.namespace_exists("elsewhere")
