"""The operator's request counter names the resource (and subresource) each URL addresses."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from meshtls.kube.client import ApiError, Conflict, Kube, NotFound, request_resource, request_target


@pytest.mark.parametrize(("url", "resource"), [
    ("https://h:6443/api/v1/namespaces/ns/secrets", "secrets"),
    ("https://h:6443/api/v1/namespaces/ns/secrets/web-mtls", "secrets"),
    ("https://h/apis/meshtls.dev/v1alpha1/namespaces/ns/workloadidentities/w/status", "workloadidentities/status"),
    ("https://h/apis/meshtls.dev/v1alpha1/namespaces/ns/workloadidentities/w", "workloadidentities"),
    ("https://h/apis/meshtls.dev/v1alpha1/trustdomains/t/status", "trustdomains/status"),
    ("https://h/api/v1/namespaces/ns", "namespaces"),
    ("https://h/api/v1/namespaces", "namespaces"),
    ("https://h/apis/coordination.k8s.io/v1/namespaces/a/leases/b?fieldManager=x", "leases"),
    ("https://h/prefix-less", "prefix-less"),
    ("https://h/", ""),
])
def test_request_resource(url: str, resource: str) -> None:
    assert request_resource(url) == resource


@pytest.mark.parametrize(("url", "target"), [
    ("https://h/api/v1/namespaces/ns/secrets/web-mtls", ("ns", "secrets")),
    ("https://h/apis/meshtls.dev/v1alpha1/namespaces/ns/workloadidentities/w/status",
     ("ns", "workloadidentities/status")),
    ("https://h/apis/meshtls.dev/v1alpha1/trustdomains/t", ("", "trustdomains")),
    ("https://h/api/v1/namespaces/ns", ("", "namespaces")),
    ("https://h/apis/meshtls.dev/v1alpha1/workloadidentities?watch=true", ("", "workloadidentities")),
])
def test_request_target_names_the_namespace(url: str, target: tuple[str, str]) -> None:
    assert request_target(url) == target


def test_the_operator_counts_requests_by_scope() -> None:
    from prometheus_client import generate_latest

    from meshtls.controller import metrics

    count = metrics.request_counter("meshtls-system")
    for namespace in ("meshtls-system", "shop", ""):
        count("GET", namespace, "secrets")
    text = generate_latest(metrics.REGISTRY).decode()
    for scope in ("operator", "workloads", "cluster"):
        assert f'meshtls_api_requests_total{{resource="secrets",scope="{scope}",verb="GET"}}' in text


class _Released:
    """A watch response the reader has already released: shutting it down raises, as urllib3's does."""

    def __init__(self) -> None:
        self.shut = 0

    def shutdown(self) -> None:
        self.shut += 1
        raise RuntimeError("Cannot shutdown as connection has already been released to the pool")


def _kube_with_stream(events: list[tuple[str, dict[str, object]]], response: object,
                      block: threading.Event | None = None) -> Kube:
    from kubernetes import client

    kube = Kube(client.ApiClient(client.Configuration()))

    def lines(path: str, selector: str | None, version: str, timeout: int, opened: Any,
              skip: tuple[bytes, ...] = ()) -> Iterator[tuple[str, Any]]:
        opened(response)
        yield from events
        if block is not None:
            block.wait(5)

    kube._watch_lines = lines  # type: ignore[method-assign]
    return kube


def test_a_watch_the_server_ended_ends_quietly_and_a_consumer_that_stops_ends_the_reader() -> None:
    events = [("ADDED", {"metadata": {"name": str(i)}}) for i in range(50)]

    async def read_all(kube: Kube) -> list[tuple[str, dict[str, Any]]]:
        return [e async for e in kube.watch_objects("/p", None, "1")]

    released = _Released()
    # no error from shutting down what the reader released already (it used to end every watch with a relist)
    assert asyncio.run(read_all(_kube_with_stream(events, released))) == events

    class Open:
        shut = 0

        def shutdown(self) -> None:
            self.shut += 1
            gate.set()

    gate, response = threading.Event(), Open()

    async def first_only(kube: Kube) -> tuple[str, dict[str, Any]]:
        async for event in kube.watch_objects("/p", None, "1"):
            return event
        raise AssertionError("no event")

    assert asyncio.run(first_only(_kube_with_stream(events, response, gate))) == events[0]
    assert response.shut == 1  # the reader, still blocked on the stream, was released


class _Answer:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.reason, self.data = status, "", json.dumps(body).encode()


def _kube_answering(status: int, body: dict[str, Any]) -> tuple[Kube, list[tuple[str, str, Any, str]]]:
    from kubernetes import client

    kube = Kube(client.ApiClient(client.Configuration()))
    sent: list[tuple[str, str, Any, str]] = []

    def send(method: str, path: str, payload: bytes | None, content_type: str, preload: bool = True,
             timeout: Any = None) -> _Answer:
        sent.append((method, path, json.loads(payload or b"null"), content_type))
        return _Answer(status, body)

    kube._send = send  # type: ignore[method-assign]
    return kube, sent


def test_a_bundle_is_patched_in_one_request_that_first_tests_it_is_ours() -> None:
    kube, sent = _kube_answering(200, {"metadata": {"resourceVersion": "42"}, "data": {"ca.crt": "x"}})
    labels = {"app.kubernetes.io/managed-by": "meshtls", "meshtls.dev/bundle": "true"}
    version = kube.update_owned_configmap("ns", "meshtls-bundle", {"ca.crt": "x", "crl.pem": "y"}, labels,
                                          {"meshtls.dev/trust-domains": "a.example"})
    assert version == "42"
    [(method, path, ops, content_type)] = sent
    assert (method, path, content_type) == ("PATCH", "/api/v1/namespaces/ns/configmaps/meshtls-bundle",
                                            "application/json-patch+json")
    # the test comes first: the API server applies none of the ops when it fails
    assert ops[0] == {"op": "test", "path": "/metadata/labels/app.kubernetes.io~1managed-by", "value": "meshtls"}
    assert {op["path"]: op["value"] for op in ops[1:]} == {
        "/metadata/labels": labels, "/metadata/annotations": {"meshtls.dev/trust-domains": "a.example"},
        "/data": {"ca.crt": "x", "crl.pem": "y"}}


@pytest.mark.parametrize(("status", "raised"), [(404, NotFound), (409, Conflict), (422, ApiError), (500, ApiError)])
def test_a_refused_bundle_patch_raises_what_the_caller_falls_back_on(status: int, raised: type[Exception]) -> None:
    kube, _sent = _kube_answering(status, {"kind": "Status", "message": "testing value failed"})
    with pytest.raises(raised) as caught:
        kube.update_owned_configmap("ns", "b", {}, {}, {})
    if raised is ApiError:
        assert caught.value.status == status  # type: ignore[attr-defined]
