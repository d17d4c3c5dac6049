"""The benchmark's own arithmetic and report, without a cluster (the real run is `make bench`)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pytest
from bench import report
from bench.common import Knobs, diff_counts, pct, prom_value, split_rw, summarize_profile
from bench.revocation import _crl_serials
from bench.steady import busiest_window, per_minute, simulate, spread

from meshtls.pki import RevocationReason, RevokedCertificate, build_crl, crl_pem, generate_ca


def test_knobs_small_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTLS_BENCH_SMALL", "1")
    monkeypatch.setenv("MESHTLS_BENCH_N", "60")
    monkeypatch.setenv("MESHTLS_BENCH_SECTIONS", "issuance, dataplane")
    k = Knobs.from_env()
    assert k.small and k.n == 60 and k.steady_n >= 60
    assert k.sections == ("issuance", "dataplane")
    assert k.dp_bytes < Knobs().dp_bytes


def test_percentiles_and_windows() -> None:
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct(list(map(float, range(1, 101))), 99) == 99.0
    assert busiest_window([0, 10, 59, 60, 61, 200]) == 4  # 10, 59, 60, 61 within 60 s
    assert per_minute([0, 30, 61, 179], 0) == [2, 1, 1]


def test_api_request_accounting() -> None:
    before = Counter({("GET", "secrets", ""): 5, ("POST", "secrets", ""): 1})
    after = Counter({("GET", "secrets", ""): 15, ("POST", "secrets", ""): 11, ("PATCH", "workloadidentities", "status"):
                     10, ("PUT", "leases", ""): 99})
    delta = diff_counts(after, before, {"secrets", "workloadidentities"})
    assert delta == {"GET secrets": 10, "PATCH workloadidentities/status": 10, "POST secrets": 10}
    assert split_rw(delta) == (10, 20)
    text = 'x_total{a="1"} 2\nx_total{a="2"} 3\nx_total_other 7\n'
    assert prom_value(text, "x_total") == 5


def test_crl_serials_reads_every_crl_in_a_bundle() -> None:
    now = dt.datetime.now(dt.UTC)
    pems = b""
    for name in ("a.test", "b.test"):
        ca = generate_ca(name, now)
        entry = RevokedCertificate(1000 + len(pems), now, now + dt.timedelta(hours=1), RevocationReason.UNSPECIFIED)
        pems += crl_pem(build_crl(ca, [entry], 1, now))
    assert len(_crl_serials(pems.decode())) == 2


def test_rotation_spread_of_a_burst_and_the_simulation() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    items = []
    for i in range(300):
        issued = start + dt.timedelta(seconds=i / 10)  # 300 identities issued within 30 s
        not_before = issued - dt.timedelta(seconds=60)
        renew = issued + dt.timedelta(minutes=40) - dt.timedelta(seconds=(i * 7) % 180)
        items.append({"status": {"notBefore": not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                 "renewalTime": renew.strftime("%Y-%m-%dT%H:%M:%SZ")}})
    result = spread(items)
    assert result["identities"] == 300
    assert result["busiest_to_average"] > 2  # a burst rotates as a burst
    proposed = result["simulated_24h_first_renewal_uniform"]
    assert proposed["first_cycle_busiest_minute"] < result["simulated_24h_current_rule"]["first_cycle_busiest_minute"]
    sim = simulate([0.0, 1.0], 2, first_uniform=False)
    assert sim["mean_period_min"] > 30


def test_profile_summary(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);work (a.py:5);hash (b.py:2) 3\nmain (a.py:1);idle (a.py:9) 1\n")
    summarize_profile(raw, tmp_path / "top.txt")
    text = (tmp_path / "top.txt").read_text()
    assert "75.0%  work (a.py)" in text and "100.0%  main (a.py)" in text


def test_report_renders_from_results(tmp_path: Path) -> None:
    """A results.json shaped like a real run renders to markdown (plots too, with matplotlib installed)."""
    side = {"identities": 10, "ready": 10, "completed": True, "seconds": 1.0, "create_seconds": 0.5,
            "identities_per_second": 10.0, "latency_p50_s": 0.3, "latency_p99_s": 0.5, "latency_max_s": 0.6,
            "api_requests": {"POST secrets": 10}, "reads_per_identity": 1.0, "writes_per_identity": 4.0,
            "issuer_cpu_ms_per_identity": 5.0, "control_plane_cpu_ms_per_identity": 9.0,
            "cpu_bound_ceiling_per_s": 100.0, "peak_rss_mb": {"issuer": 80.0}, "cpu_seconds": {"issuer": 0.05},
            "secrets": {"valid": 10, "invalid": 0, "missing": 0},
            "machine": {"machine_busy_cores": 1.5, "loadavg_1m": 2.0},
            "timeline_s": [0.1 * i for i in range(10)], "latencies_s": [0.3] * 10}
    results = {
        "started": "now", "seconds": 1, "errors": {},
        "machine": {"cpus": 2, "commit": "abc", "operator_changes_not_committed": []},
        "knobs": {"n": 10, "steady_n": 20, "namespaces": 1, "workers": 4, "idle_seconds": 1, "small": True},
        "issuance": {"meshtls": side, "floor": side, "summary": {
            "identities_per_second": 10.0, "floor_identities_per_second": 10.0, "ratio_to_floor": 1.0,
            "writes_per_identity": 4.0, "reads_per_identity": 1.0,
            "goals": {"at_most_3_writes_per_issuance": False, "no_read_per_issuance": False,
                      "cpu_at_most_4ms_per_issuance": False, "at_least_0_9_of_the_floor": True}}},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    report.write(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## 1. Issuance" in text and "**not met**" in text


def test_report_merges_the_parts_of_a_reference_run(tmp_path: Path) -> None:
    """results.json plus results-<part>.json: each part's sections replace the base's; the header is the issuance
    part's."""
    (tmp_path / "results.json").write_text(json.dumps({
        "machine": {"commit": "old"}, "knobs": {"n": 1}, "errors": {}, "issuance": {"old": True},
        "dataplane": {"kept": True}}))
    (tmp_path / "results-operator.json").write_text(json.dumps({
        "machine": {"commit": "new"}, "knobs": {"n": 1000}, "started": "t", "errors": {"steady": "x"},
        "issuance": {"new": True}, "steady": {"s": 1}}))
    merged = report.load(tmp_path)
    assert merged["issuance"] == {"new": True} and merged["steady"] == {"s": 1}
    assert merged["dataplane"] == {"kept": True}
    assert merged["machine"]["commit"] == "new" and merged["knobs"]["n"] == 1000
    assert merged["errors"] == {"steady": "x"}
    assert merged["parts"]["results-operator.json"]["sections"] == ["issuance", "steady"]


def test_a_simulated_day_starts_at_each_real_first_renewal_and_follows_the_operators_rule() -> None:
    from bench.steady import simulate_day

    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

    def item(i: int) -> dict[str, object]:
        issued = t0 + dt.timedelta(seconds=i)
        first = issued + dt.timedelta(minutes=10 + (i % 30))
        return {"status": {"notBefore": (issued - dt.timedelta(seconds=30)).isoformat().replace("+00:00", "Z"),
                           "renewalTime": first.isoformat().replace("+00:00", "Z")}}

    day = simulate_day([item(i) for i in range(200)])
    assert day["identities"] == 200
    # 24 h of renewals at ~2/3 h each (jitter earlier, up to 5 % of the lifetime): 35-38 per identity
    assert 200 * 35 <= day["rotations"] <= 200 * 38
    assert day["average_minute"] == round(day["rotations"] / 1440, 1)
    assert day["busiest_minute"] >= day["average_minute"] and day["busiest_to_average"] >= 1
    assert sum(day["per_minute"]) == day["rotations"]
