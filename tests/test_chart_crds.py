"""The Helm chart ships the CRDs of crds/ unchanged, plus kopf's peering CRDs, and stays in step with the package."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
CHART = REPO / "charts" / "meshtls"
KOPF_PEERINGS = "kopf.dev-peerings.yaml"


def test_chart_crds_are_byte_identical_to_crds_dir() -> None:
    ours = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert ours, "no CRDs in crds/"
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == sorted([*ours, KOPF_PEERINGS]), (
        f"charts/meshtls/crds/ must hold exactly crds/*.yaml plus {KOPF_PEERINGS}; has {shipped}")
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (CRDS / name).read_bytes(), (
            f"charts/meshtls/crds/{name} differs from crds/{name}: copy it (cp crds/*.yaml charts/meshtls/crds/)")


def test_kopf_peering_crds_keep_the_status_kopf_writes() -> None:
    docs = list(yaml.safe_load_all((CHART / "crds" / KOPF_PEERINGS).read_text()))
    by_name = {d["metadata"]["name"]: d for d in docs}
    assert set(by_name) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert by_name["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert by_name["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for crd in docs:
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status.get("x-kubernetes-preserve-unknown-fields") is True  # else the keep-alives are pruned
        assert "subresources" not in version  # kopf patches status on the object itself


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version, "Chart.yaml appVersion must follow pyproject.toml (the image tag)"
    assert chart["name"] == "meshtls" and chart["apiVersion"] == "v2"
