"""One place for the names meshtls gives what it writes: the operator, the webhook and the CLI agree on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtls.api import names
from meshtls.api.constants import DEFAULT_BUNDLE_CONFIGMAP
from meshtls.api.model import parse_workload_identity
from meshtls.cli.commands.cluster import bundle_name_of
from meshtls.cli.views.identities import secret_name_of
from meshtls.kube.client import NotFound

CHART = Path(__file__).resolve().parents[1] / "charts" / "meshtls"
IDENTITY_NAMES = ["web", "a", "x" * 60, "api-v2", "db.primary", "n0"]
TRUST_DOMAINS = ["example.org", "td", "prod_eu.example", "a-b.c-d", "x" * 63]


def identity_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop"}, "spec": {"serviceAccountName": "sa", **spec}}


@pytest.mark.parametrize("name", IDENTITY_NAMES)
def test_the_operator_and_the_cli_default_the_secret_name_alike(name: str) -> None:
    body = identity_body(name)
    assert parse_workload_identity(body).secret_name == secret_name_of(body) == names.default_secret_name(name)
    named = identity_body(name, secretName="mine")
    assert parse_workload_identity(named).secret_name == secret_name_of(named) == "mine"
    issued = {**named, "status": {"secretName": "issued-into"}}
    assert secret_name_of(issued) == "issued-into"  # where the certificate is, even while the spec moves


@pytest.mark.parametrize("td", TRUST_DOMAINS)
def test_the_state_secret_name_fits_an_object_name(td: str) -> None:
    assert len(names.state_secret_name(td)) <= names.MAX_OBJECT_NAME


def test_the_python_default_image_is_the_charts() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{values['image']['repository']}:{chart['appVersion']}" == names.DEFAULT_SIDECAR_IMAGE


class TrustDomainsOnly:
    def __init__(self, bodies: dict[str, dict[str, Any]]) -> None:
        self.bodies = bodies

    def get_trust_domain(self, name: str) -> dict[str, Any] | None:
        if name == "gone":
            raise NotFound(404, "not found")
        return self.bodies.get(name)


def test_the_cli_reads_the_bundle_name_as_the_operator_parses_it() -> None:
    bodies = {
        "custom.org": {"metadata": {"name": "custom.org"}, "spec": {"bundle": {"configMapName": "shop-roots"}}},
        "plain.org": {"metadata": {"name": "plain.org"}, "spec": {}},
        "empty.org": {"metadata": {"name": "empty.org"}},
        # the operator refuses this spec (a reserved name): it never publishes a bundle under it
        "bad.org": {"metadata": {"name": "bad.org"}, "spec": {"bundle": {"configMapName": "kube-root-ca.crt"}}},
        "typed.org": {"metadata": {"name": "typed.org"}, "spec": {"bundle": {"configMapName": 7}}},
    }
    kube = TrustDomainsOnly(bodies)
    expected = {"custom.org": "shop-roots", **{td: DEFAULT_BUNDLE_CONFIGMAP for td in (
        "plain.org", "empty.org", "bad.org", "typed.org", "missing.org", "gone")}}
    for td, want in expected.items():
        assert bundle_name_of(kube, td) == want, td  # type: ignore[arg-type]
    assert bundle_name_of(kube, None) == DEFAULT_BUNDLE_CONFIGMAP  # type: ignore[arg-type]
