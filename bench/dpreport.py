"""Section 4 of report.md and its plot, from the `dataplane` part of results.json (see bench/dataplane.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {"meshtls": "meshtls-proxy", "envoy": "Envoy (as rendered)", "nginx": "nginx (stream)",
          "envoy-x25519": "Envoy, X25519 only", "envoy-1m": "Envoy, 1 MiB buffers",
          "meshtls-before": "meshtls-proxy before"}


def _mark(ok: Any) -> str:
    return "met" if ok is True else ("**not met**" if ok is False else "n/a")


def _mem(side: dict[str, float]) -> str:
    return f"{side['rss']} / {side['pss']} / {side['anon']} / {side['private']}"


def _choice(decision: dict[str, Any]) -> str:
    return str(decision["choice"]) if decision["choice"] else "undecided"


def markdown(dp: dict[str, Any]) -> list[str]:
    three = ("meshtls", "envoy", "nginx")
    cpu, hs, hsr = dp["cpu_s_per_gib"], dp["handshakes_per_cpu_s"], dp["handshakes_per_cpu_s_resumption_on"]
    lat, add, mem, idle = dp["latency_ms"], dp["latency_added_ms"], dp["memory_mb"], dp["memory_idle_mb"]
    r, goals = dp["ratios"], dp["goals"]
    counters = hsr["counters"]

    def resumed_share(name: str) -> str:
        c = counters.get(name) or {}
        if not c.get("handshakes") or c.get("resumed") != c.get("resumed"):  # no counters, or nan
            return ""
        return f" ({c['resumed'] / c['handshakes'] * 100:.0f} % resumed)"

    def row(title: str, cells: list[str]) -> str:
        return f"| {title} | " + " | ".join(cells) + " |"

    lines = [
        "## 4. Data plane: meshtls-proxy, Envoy (as meshtls renders it) and nginx",
        "",
        f"Client-side proxy (originates mTLS) -> server-side proxy (terminates, verifies the client) -> app, on "
        f"loopback, the same certificates and CRL; best of {dp['rounds']} rounds; CPU of both proxies of a pair. "
        f"Envoy negotiated {dp['negotiated_group']['envoy']} (from its `ssl.curves` counters); meshtls-proxy "
        "(OpenSSL 3.0) and nginx X25519.",
        "",
        "| per proxy pair | " + " | ".join(LABELS[n] for n in three) + " |",
        "|---|---|---|---|",
        row(f"CPU-s per GiB moved ({dp['bytes_per_run'] >> 20} MiB per run)", [f"{cpu[n]}" for n in three]),
        row(f"full mTLS handshakes per CPU-s ({dp['handshakes_per_run']} connections)", [f"{hs[n]}" for n in three]),
        row("handshakes per CPU-s, resumption on (defaults)", [f"{hsr[n]}{resumed_share(n)}" for n in three]),
        row(f"latency added at {dp['latency_rate']} req/s of 1 KiB, p50 / p99 (direct: {lat['direct']['p50']} / "
            f"{lat['direct']['p99']} ms)", [f"{add[n]['p50_ms']} / {add[n]['p99_ms']} ms" for n in three]),
        row("memory per sidecar after the load, client side: RSS / PSS / anonymous / private MB",
            [_mem(mem[n]["client-side"]) for n in three]),
        row("the same, server side", [_mem(mem[n]["server-side"]) for n in three]),
        row("idle after start, server side", [_mem(idle[n]["server-side"]) for n in three]),
        "",
        "nginx: master + worker summed. Anonymous = heap, stacks, buffers; private = pages no other process maps "
        "(file-backed ones included); a binary shared by every sidecar on a node is in RSS, split in PSS.",
        "",
        "| ratio (same run) | meshtls-proxy | Envoy |",
        "|---|---|---|",
        f"| CPU per GiB / nginx's | {r['cpu_per_gib_meshtls_over_nginx']}x | {r['cpu_per_gib_envoy_over_nginx']}x |",
        f"| full handshakes per CPU-s / nginx's | {r['handshakes_per_cpu_meshtls_over_nginx']}x | "
        f"{r['handshakes_per_cpu_envoy_over_nginx']}x |",
        f"| resumed handshakes per CPU-s / nginx's | {r['resumed_handshakes_per_cpu_meshtls_over_nginx']}x | "
        f"{r['resumed_handshakes_per_cpu_envoy_over_nginx']}x |",
        "",
        f"Cost of the post-quantum group (Envoy <-> Envoy, {dp['negotiated_group']['envoy']} vs "
        f"{dp['negotiated_group']['envoy-x25519']}, asserted from Envoy's counters): full handshakes per CPU-s "
        f"{hs['envoy']} vs {hs['envoy-x25519']} = **{r['envoy_pq_over_x25519_full_handshakes']}x**; with resumption "
        f"{hsr['envoy']} vs {hsr['envoy-x25519']} = {r['envoy_pq_over_x25519_resumed_handshakes']}x.",
        "",
    ]
    if "envoy-1m" in cpu:
        w1m, we = dp["memory_worst_side_mb"]["envoy-1m"], dp["memory_worst_side_mb"]["envoy"]
        lines += [
            f"What the rendered {dp['envoy_buffer_limit_bytes'] // 1024} KiB per-connection buffer limit "
            "(`per_connection_buffer_limit_bytes` on every listener and cluster) saves, against the same Envoy with "
            f"Envoy's default 1 MiB (`envoy-1m`), same run: anonymous memory per sidecar after the load "
            f"{we['anon']} MB vs {w1m['anon']} MB ({r['envoy_over_envoy_1m_anonymous_memory']}x), RSS {we['rss']} vs "
            f"{w1m['rss']} MB, PSS {we['pss']} vs {w1m['pss']} MB; CPU-s per GiB {cpu['envoy']} vs {cpu['envoy-1m']} "
            f"({r['envoy_over_envoy_1m_cpu_per_gib']}x), full handshakes per CPU-s {hs['envoy']} vs "
            f"{hs['envoy-1m']} ({r['envoy_over_envoy_1m_full_handshakes']}x).",
            "",
        ]
    if "meshtls-before" in cpu:
        lines += [
            f"meshtls-proxy before / after its changes (`meshtls-before` = the proxy at `{dp['baseline']}`, same run): "
            f"CPU-s per GiB {cpu['meshtls-before']} -> {cpu['meshtls']} "
            f"({r['meshtls_after_over_before_cpu_per_gib']}x), full handshakes per CPU-s {hs['meshtls-before']} -> "
            f"{hs['meshtls']} ({r['meshtls_after_over_before_full_handshakes']}x), with resumption "
            f"{hsr['meshtls-before']} -> {hsr['meshtls']} ({r['meshtls_after_over_before_resumed_handshakes']}x), "
            f"p99 added {add['meshtls-before']['p99_ms']} -> {add['meshtls']['p99_ms']} ms.",
            "",
        ]
    w = dp["memory_worst_side_mb"]
    lines += [
        "| goal | result | |",
        "|---|---|---|",
        f"| Envoy CPU per GiB <= 0.9x nginx | {r['cpu_per_gib_envoy_over_nginx']}x | "
        f"{_mark(goals['envoy_cpu_per_gib_at_most_0.9x_nginx'])} |",
        f"| Envoy full handshakes per CPU-s >= 1.5x nginx | {r['handshakes_per_cpu_envoy_over_nginx']}x | "
        f"{_mark(goals['envoy_full_handshakes_at_least_1.5x_nginx'])} |",
        f"| anonymous memory per Envoy sidecar <= 20 MB | {w['envoy']['anon']} MB (RSS {w['envoy']['rss']}, PSS "
        f"{w['envoy']['pss']}) | {_mark(goals['envoy_anonymous_memory_per_sidecar_at_most_20mb'])} |",
        f"| meshtls-proxy CPU per GiB <= nginx | {r['cpu_per_gib_meshtls_over_nginx']}x | "
        f"{_mark(goals['meshtls_cpu_per_gib_no_worse_than_nginx'])} |",
        f"| meshtls-proxy full handshakes per CPU-s >= 0.9x nginx | {r['handshakes_per_cpu_meshtls_over_nginx']}x | "
        f"{_mark(goals['meshtls_handshakes_per_cpu_at_least_0.9x_nginx'])} |",
        f"| meshtls-proxy p99 added < 1 ms | {add['meshtls']['p99_ms']} ms | "
        f"{_mark(goals['meshtls_p99_added_under_1ms'])} |",
        f"| meshtls-proxy RSS per sidecar <= 40 MB | {w['meshtls']['rss']} MB | "
        f"{_mark(goals['meshtls_rss_per_sidecar_at_most_40mb'])} |",
        "",
        f"Chart default by these figures: **{_choice(dp['default_data_plane'])}** ({dp['default_data_plane']['why']}).",
        "",
        f"Rounds: CPU-s/GiB {json.dumps(cpu['all_rounds'])}; full handshakes/CPU-s {json.dumps(hs['all_rounds'])}; "
        f"with resumption {json.dumps(hsr['all_rounds'])}. Failed connections: {json.dumps(hs['failed'])}, "
        f"{json.dumps(hsr['failed'])}. Counters (full-handshake run): {json.dumps(hs['counters'])}; "
        f"(resumption on): {json.dumps(counters)}. Peak RSS: {json.dumps(dp['peak_rss_mb'])}. "
        f"Machine during the section: {dp['machine']}.",
        "",
    ]
    return lines


def plot(dp: dict[str, Any], out: Path, plt: Any) -> str:
    """Each data plane relative to nginx (= 1), with the goals as red marks; returns the file name."""
    r = dp["ratios"]
    w = dp["memory_worst_side_mb"]
    names = ["CPU-s per GiB\n(lower is better)", "full handshakes\nper CPU-s", "resumed handshakes\nper CPU-s",
             "PSS per sidecar\n(lower is better)", "anonymous memory\nper sidecar (lower)"]
    series = {
        "meshtls-proxy": [r["cpu_per_gib_meshtls_over_nginx"], r["handshakes_per_cpu_meshtls_over_nginx"],
                          r["resumed_handshakes_per_cpu_meshtls_over_nginx"], w["meshtls"]["pss"] / w["nginx"]["pss"],
                          w["meshtls"]["anon"] / w["nginx"]["anon"]],
        "Envoy (as rendered)": [r["cpu_per_gib_envoy_over_nginx"], r["handshakes_per_cpu_envoy_over_nginx"],
                                r["resumed_handshakes_per_cpu_envoy_over_nginx"], w["envoy"]["pss"] / w["nginx"]["pss"],
                                w["envoy"]["anon"] / w["nginx"]["anon"]],
    }
    envoy_goals = [0.9, 1.5, None, None, None]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for k, (label, vals) in enumerate(series.items()):
        xs = [i + (k - 0.5) * width for i in range(len(vals))]
        bars = ax.bar(xs, vals, width, label=label, color=("tab:blue", "tab:purple")[k])
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=7)
    for i, g in enumerate(envoy_goals):
        if g is not None:
            ax.plot([i, i + width], [g, g], color="tab:red", lw=2, label="Envoy goal" if i == 0 else None)
    ax.axhline(1.0, color="k", ls="--", label="nginx = 1")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("relative to nginx")
    ax.set_title("Data planes relative to nginx (stream): same certificates, loopback, one run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "dataplane_ratios.png", dpi=90)
    plt.close(fig)
    return "dataplane_ratios.png"
