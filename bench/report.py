"""report.md and PNG plots from results.json (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import dpreport


def _mark(ok: Any) -> str:
    return "met" if ok is True else ("**not met**" if ok is False else "n/a")


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plots(results: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    made: list[str] = []
    iss = results.get("issuance") or {}
    if iss.get("meshtls") and iss.get("floor"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, key, color in (("meshtls operator", "meshtls", "tab:blue"), ("floor (minimal issuer)", "floor",
                                                                               "tab:gray")):
            tl = iss[key]["timeline_s"]
            ax.step([0, *tl], list(range(len(tl) + 1)), where="post", label=f"{label}: "
                    f"{iss[key]['identities_per_second']} /s", color=color)
        ax.set_xlabel("seconds since the first create")
        ax.set_ylabel("identities Ready")
        ax.set_title(f"Issuance of {iss['meshtls']['identities']} WorkloadIdentities applied at once")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "issuance_timeline.png", dpi=90)
        plt.close(fig)
        made.append("issuance_timeline.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        both = iss["meshtls"]["latencies_s"] + iss["floor"]["latencies_s"]
        bins = 40
        top = max(both) if both else 1
        for label, key, color in (("meshtls", "meshtls", "tab:blue"), ("floor", "floor", "tab:gray")):
            ax.hist(iss[key]["latencies_s"], bins=bins, range=(0, top), alpha=0.6, color=color,
                    label=f"{label}: p50 {iss[key]['latency_p50_s']:.2f} s, p99 {iss[key]['latency_p99_s']:.2f} s")
        ax.set_xlabel("creation -> Ready (s)")
        ax.set_ylabel("identities")
        ax.set_title("Creation to Ready latency")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "issuance_latency.png", dpi=90)
        plt.close(fig)
        made.append("issuance_latency.png")

    rot = (results.get("steady") or {}).get("rotation") or {}
    if rot.get("first_rotations_per_minute"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        first = rot["first_rotations_per_minute"]
        axes[0].bar(range(len(first)), first, color="tab:blue", label="rotations in the minute")
        axes[0].axhline(rot["average_minute"], color="k", ls="--", label=f"average minute ({rot['average_minute']})")
        axes[0].set_title(f"First rotation of {rot['identities']} identities (measured)")
        axes[0].set_xlabel("minutes after the first issuance")
        axes[0].set_ylabel("rotations per minute")
        axes[0].legend(fontsize=8)
        day = (results.get("steady") or {}).get("simulated_day") or {}
        if day.get("per_minute"):
            axes[1].plot(day["per_minute"], color="tab:blue", lw=0.6,
                         label=f"rotations per minute (busiest {day['busiest_to_average']}x the average)")
            axes[1].axhline(day["average_minute"], color="k", ls="--", label="average minute")
            axes[1].axhline(1.5 * day["average_minute"], color="tab:red", ls=":", label="goal: 1.5x average")
        axes[1].set_title("One simulated day (the operator's renewal_time)")
        axes[1].set_xlabel("minute of the day")
        axes[1].legend(fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "rotation_spread.png", dpi=90)
        plt.close(fig)
        made.append("rotation_spread.png")

    dp = results.get("dataplane") or {}
    if dp.get("memory_mb"):
        made.append(dpreport.plot(dp, out, plt))
    return made


def markdown(results: dict[str, Any], images: list[str]) -> str:
    m = results.get("machine", {})
    k = results.get("knobs", {})
    lines = [
        "# meshtls benchmark report",
        "",
        f"Run {results.get('started')} on {m.get('cpus')} CPUs ({m.get('cpu_model')}), Python {m.get('python')}, "
        f"commit {m.get('commit')}"
        + (f" (operator files changed but not committed: {', '.join(m['operator_changes_not_committed'])})"
           if m.get("operator_changes_not_committed") else "") + ".",
        f"Load average at start: {m.get('loadavg_at_start')} (a shared machine: other test runs were using it; "
        "ratios measured in the same run are the figures to trust).",
        f"Scale: N={k.get('n')}, steady {k.get('steady_n')}, {k.get('namespaces')} namespaces, {k.get('workers')} "
        f"client threads{' (SMALL smoke size)' if k.get('small') else ''}. Total {results.get('seconds')} s.",
        "",
    ]
    if results.get("parts"):
        lines += ["Committed in parts (`python -m bench.report DIR` merges them): " + "; ".join(
            f"`{name}`: {', '.join(p['sections'])} (run {p['started']}, commit {p['commit']})"
            for name, p in results["parts"].items()) + (" and `results.json` for the rest." if any(
                s in results for s in SECTIONS if not any(s in p["sections"] for p in results["parts"].values()))
                else "."), ""]
    if results.get("errors"):
        lines += ["**Errors:** " + "; ".join(f"{s}: {e}" for s, e in results["errors"].items()), ""]
    iss = results.get("issuance")
    if iss:
        mi, fl, su = iss["meshtls"], iss["floor"], iss["summary"]
        lines += [
            "## 1. Issuance",
            "",
            "| | meshtls | floor (create Secret + patch status only) |",
            "|---|---|---|",
            f"| identities Ready / applied | {mi['ready']} / {mi['identities']} | {fl['ready']} / {fl['identities']} |",
            f"| identities/s (first POST to last Ready) | **{mi['identities_per_second']}** | "
            f"{fl['identities_per_second']} |",
            f"| time to create the objects (bench client) | {mi['create_seconds']} s | {fl['create_seconds']} s |",
            f"| creation -> Ready p50 / p99 | {mi['latency_p50_s']} s / {mi['latency_p99_s']} s | "
            f"{fl['latency_p50_s']} s / {fl['latency_p99_s']} s |",
            f"| API writes per identity | **{mi['writes_per_identity']}** | {fl['writes_per_identity']} |",
            f"| API reads per identity (excl. the GC's owner GETs) | {mi['reads_per_identity']} | "
            f"{fl['reads_per_identity']} |",
            f"| the operator's own count (meshtls_api_requests_total): writes / reads per identity (identity GETs "
            f"of the request-race fix) | {mi.get('operator_writes_per_identity')} / "
            f"{mi.get('operator_reads_per_identity')} ({mi.get('operator_identity_gets')}) | - |",
            f"| issuer CPU per identity | {mi['issuer_cpu_ms_per_identity']} ms | "
            f"{fl['issuer_cpu_ms_per_identity']} ms |",
            f"| kube-apiserver + etcd CPU per identity | {mi['control_plane_cpu_ms_per_identity']} ms | "
            f"{fl['control_plane_cpu_ms_per_identity']} ms |",
            f"| CPU-bound ceiling on this machine (cores / all CPU per identity) | {mi['cpu_bound_ceiling_per_s']} /s "
            f"| {fl['cpu_bound_ceiling_per_s']} /s |",
            f"| issuer peak RSS | {mi['peak_rss_mb'].get('issuer')} MB | {fl['peak_rss_mb'].get('issuer')} MB |",
            f"| valid Secrets (chain verifies, SPIFFE ID right) | {mi['secrets']['valid']} | "
            f"{fl['secrets']['valid']} |",
            f"| machine busy (cores) / load average | {mi['machine']['machine_busy_cores']} / "
            f"{mi['machine']['loadavg_1m']} | {fl['machine']['machine_busy_cores']} / {fl['machine']['loadavg_1m']} |",
            "",
            f"API requests during meshtls issuance: `{json.dumps(mi['api_requests'])}`  ",
            f"during the floor: `{json.dumps(fl['api_requests'])}`",
            "",
            "| goal | result | |",
            "|---|---|---|",
            f"| <= 3 API writes per issuance | {su['writes_per_identity']} | "
            f"{_mark(su['goals']['at_most_3_writes_per_issuance'])} |",
            f"| 0 reads per issuance (the operator's own GETs per identity) | "
            f"{mi.get('operator_reads_per_identity')} | {_mark(su['goals']['no_read_per_issuance'])} |",
            f"| operator CPU <= 4 ms per issuance | {mi['issuer_cpu_ms_per_identity']} ms | "
            f"{_mark(su['goals']['cpu_at_most_4ms_per_issuance'])} |",
            f"| >= 0.9x the floor's rate (same run) | {su['ratio_to_floor']}x the floor "
            f"({su['identities_per_second']} vs {su['floor_identities_per_second']} /s) | "
            f"{_mark(su['goals']['at_least_0_9_of_the_floor'])} |",
            "",
        ]
    st = results.get("steady")
    if st:
        rot = st.get("rotation") or {}
        day = st.get("simulated_day") or {}
        one, fifty = st["one_namespace"], st["fifty_namespaces"]
        lines += [
            "## 2. Steady state",
            "",
            f"Measured, not extrapolated (the issuance section's {st['issuance_identities_also_held']} identities "
            "held throughout):",
            "",
            "| | RSS | idle CPU |",
            "|---|---|---|",
            f"| idle operator (a trust domain, no identity) | **{st['rss_mb_idle_operator']} MB** | |",
            f"| holding {one['identities']} identities in one namespace | **{one['rss_mb']} MB** (right after the "
            f"burst: {one['rss_mb_after_burst']} MB) | {one['idle_cpu_cores']} cores |",
            f"| a fresh operator (idle: {st['rss_mb_idle_operator_restarted']} MB) holding {fifty['identities']} over "
            f"50 namespaces | **{fifty['rss_mb']} MB** (after the burst: {fifty['rss_mb_after_burst']} MB) | "
            f"{fifty['idle_cpu_cores']} cores |",
            "",
            f"Issued at {one['identities_per_second']} /s (one namespace) and {fifty['identities_per_second']} /s "
            f"(50 namespaces). At 10,000 x 1 h: {st['rotation_rate_per_s_at_10000']} rotations/s x "
            f"{st['cpu_seconds_per_issuance'] * 1000:.1f} ms (section 1's CPU per issuance) + idle = "
            f"**~{st['projected_cpu_cores_at_10000']} cores**.",
            "",
            f"Rotation spread: {rot.get('identities')} identities issued within {rot.get('issued_over_s')} s renew "
            f"first within {rot.get('first_rotation_window_min')} minutes (busiest minute "
            f"{rot.get('busiest_minute')}). "
            f"One simulated day from there, each later renewal by the operator's own `renewal_time`: "
            f"{day.get('rotations')} rotations, busiest minute {day.get('busiest_minute')} vs an average minute of "
            f"{day.get('average_minute')} = **{day.get('busiest_to_average')}x** (hour 24 alone: "
            f"{day.get('last_hour_busiest_to_average')}x).",
            "",
            "| goal | result | |",
            "|---|---|---|",
            f"| idle RSS <= 70 MB | {st['rss_mb_idle_operator']} MB | "
            f"{_mark(st['goals']['idle_rss_at_most_70_mb'])} |",
            f"| RSS <= 150 MB holding 10,000 (one namespace, and over 50) | {one['rss_mb']} / {fifty['rss_mb']} MB "
            f"holding {st['identities']} | {_mark(st['goals']['rss_holding_at_most_150_mb'])} |",
            f"| busiest minute of a simulated day <= 1.5x the average | {day.get('busiest_to_average')}x | "
            f"{_mark(st['goals']['busiest_minute_of_a_simulated_day_at_most_1_5x_average'])} |",
            "",
        ]
    rv = results.get("revocation")
    if rv:
        lines += [
            "## 3. Revocation storm",
            "",
            f"{rv['identities']} identities deleted at once ({rv['serials']} serials, {rv['bundles']} bundles; DELETEs "
            f"sent in {rv['delete_seconds']} s).",
            "",
            "| | |",
            "|---|---|",
            f"| every serial on every bundle's CRL after the last DELETE was answered | "
            f"**{rv.get('seconds_after_last_delete')} s** (goal <= 5 s: {_mark(rv['goals']['crl_within_5s'])}) |",
            f"| ... after the first DELETE | {rv['seconds_until_every_crl']} s |",
            f"| every identity gone (finalizer released) after | {rv['seconds_until_all_identities_gone']} s |",
            f"| Secrets left behind | {rv['secrets_left']} |",
            f"| ConfigMap writes (bundles) | {rv['configmap_writes']} "
            f"({rv['configmap_writes_per_bundle']} per bundle) |",
            f"| operator CRL publications (meshtls_crl_publications_total) | {rv['crl_publications']:.0f} |",
            f"| CRL size in a bundle | {rv['crl_pem_bytes']} bytes |",
            f"| API writes / reads per deleted identity | {rv['writes_per_identity']} / {rv['reads_per_identity']} |",
            "",
            f"API requests: `{json.dumps(rv['api_requests'])}`",
            "",
        ]
    dp = results.get("dataplane")
    if dp and dp.get("memory_mb"):
        lines += dpreport.markdown(dp)
    for img in images:
        lines.append(f"![{img}]({img})")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    images = plots(results, out)
    (out / "report.md").write_text(markdown(results, images))


SECTIONS = ("issuance", "steady", "revocation", "dataplane")


def load(d: Path) -> dict[str, Any]:
    """results.json, with the sections of every results-<part>.json beside it laid over it (the reference run is
    committed in parts, one file per owner: results-operator.json holds issuance, steady and revocation). The
    header (machine, knobs) is the first part's that has the issuance section, else results.json's."""
    base = d / "results.json"
    merged: dict[str, Any] = json.loads(base.read_text()) if base.exists() else {"errors": {}}
    parts = sorted(d.glob("results-*.json"))
    merged["parts"] = {}
    for part in parts:
        doc = json.loads(part.read_text())
        for section in SECTIONS:
            if section in doc:
                merged[section] = doc[section]
        for key in ("machine", "knobs", "started", "seconds"):
            if key in doc and ("issuance" in doc or key not in merged):
                merged[key] = doc[key]
        merged["parts"][part.name] = {"sections": [s for s in SECTIONS if s in doc],
                                      "commit": (doc.get("machine") or {}).get("commit"),
                                      "started": doc.get("started")}
        merged.setdefault("errors", {}).update(doc.get("errors") or {})
    return merged


if __name__ == "__main__":  # re-render: python -m bench.report bench/results/<dir>
    d = Path(sys.argv[1])
    write(load(d), d)
