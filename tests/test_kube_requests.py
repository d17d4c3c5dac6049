"""The operator's request counter names the resource (and subresource) each URL addresses."""

from __future__ import annotations

import pytest

from meshtls.kube.client import request_resource, request_target


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
