"""The operator's request counter names the resource (and subresource) each URL addresses."""

from __future__ import annotations

import pytest

from meshtls.kube.client import request_resource


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
