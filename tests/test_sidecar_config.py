"""The proxy config: the operator renders it, the proxy parses it; bad shapes name the field."""

from __future__ import annotations

from typing import Any

import pytest

from meshtls.api.model import parse_trust_domain, parse_workload_identity, resolve_identity
from meshtls.dataplane.config import load_sidecar_config, parse_sidecar_config
from meshtls.injection.render import injection_target, render_sidecar_config
from meshtls.pki import PKIError


def test_rendered_config_round_trips_through_the_proxy_parser() -> None:
    body = {"metadata": {"namespace": "shop", "name": "backend", "uid": "u"}, "spec": {
        "serviceAccountName": "backend", "inbound": [{"port": 8443, "appPort": 8080}],
        "allowedPeers": ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*"],
        "outbound": [{"listenPort": 9001, "address": "db.shop.svc:5432", "peer": "spiffe://cluster.local/ns/shop/sa/db"}],
    }}
    td = parse_trust_domain({"metadata": {"name": "cluster.local"}})
    identity = resolve_identity(parse_workload_identity(body), td)
    config = render_sidecar_config(identity)
    assert load_sidecar_config(config.to_yaml()) == config
    assert config.inbound[0].allow == ("spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*")
    target = injection_target(identity, "meshtls-bundle")
    assert target.inbound_ports == (8443,) and target.config_map == "backend-meshtls-proxy"
    assert target.outbound_ports == (9001,)  # for the webhook's warning about an app container declaring it


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"inbound": [8443]}, "inbound[0]"),
        ({"inbound": [{"port": 0, "appPort": 1}]}, "inbound[0].port"),
        ({"inbound": [{"port": 1, "appPort": 2, "allow": ["http://x"]}]}, "inbound[0].allow[0]"),
        ({"outbound": {"listenPort": 1}}, "outbound"),
        ({"outbound": [{"listenPort": 1, "address": "nohost", "peer": "spiffe://a/b"}]}, "outbound[0].address"),
        ({"admin": 5}, "admin"),
        ({"reloadIntervalSeconds": "abc"}, "reloadIntervalSeconds"),
        ({"reloadIntervalSeconds": 600}, "reloadIntervalSeconds"),
        ({"spiffeId": "spiffe://Bad"}, "spiffeId"),
        ({"inbound": [{"port": 15090, "appPort": 2}]}, "inbound[0].port"),
        ({"inbound": [{"port": 1, "appPort": 2}, {"port": 3, "appPort": 1}]}, "inbound[1].appPort"),
        ({"inbound": [{"port": 1, "appPort": 15090}]}, "inbound[0].appPort"),
        ({"inbound": [{"port": 15091, "appPort": 2}]}, "inbound[0].port"),
        ({"inbound": [{"port": 1, "appPort": 15091}]}, "inbound[0].appPort"),
        ({"outbound": [{"listenPort": 15091, "address": "a:1", "peer": "spiffe://a/b"}]}, "outbound[0].listenPort"),
        ({"admin": {"port": 15091}}, "admin.port"),
        ({"inbound": [{"port": 1, "appPort": 2}],
          "outbound": [{"listenPort": 2, "address": "a:1", "peer": "spiffe://a/b"}]}, "outbound[0].listenPort"),
        ({"outbound": [{"listenPort": 1, "address": "a:1", "peer": "spiffe://a/b"},
                       {"listenPort": 1, "address": "b:1", "peer": "spiffe://a/b"}]}, "outbound[1].listenPort"),
        ({"outbound": [{"listenPort": 1, "address": "a:099", "peer": "spiffe://a/b"}]}, "outbound[0].address"),
        ({"outbound": [{"listenPort": 1, "address": "a:99999", "peer": "spiffe://a/b"}]}, "outbound[0].address"),
    ],
)
def test_bad_shapes_name_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(PKIError) as err:
        parse_sidecar_config({"spiffeId": "spiffe://td/ns/a/sa/b", **patch})
    assert err.value.field == field


def test_the_config_defaults_to_the_mounts_the_webhook_writes() -> None:
    """A config without explicit directories reads the identity and bundle where the injected pod mounts them."""
    from meshtls.dataplane import layout

    config = parse_sidecar_config({"spiffeId": "spiffe://td/ns/a/sa/b"})
    assert (config.identity_dir, config.bundle_dir) == (layout.IDENTITY_DIR, layout.BUNDLE_DIR)
    assert load_sidecar_config(config.to_yaml()) == config
