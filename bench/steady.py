"""Section 2: the operator holding many identities with 1 h certificates: memory, idle CPU, rotation spread.

Measured, not extrapolated: operator RSS idle, then holding STEADY_N identities (10,000 at full size) created in one
namespace, then (a fresh operator) STEADY_N spread over 50 namespaces; its CPU over an idle window in each; every
identity's status.renewalTime (the first rotation of each, without waiting an hour), and one simulated day of
rotations from there by the operator's own renewal function. The steady CPU at 10,000 x 1 h adds the rotation rate
times the CPU one issuance cost in section 1.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from typing import Any

from bench.common import WID_PATH, CpuWatch, LoadMeter, rss_bytes, say
from bench.context import TRUST_DOMAIN, Bench
from meshtls.pki.issue import DEFAULT_BACKDATE
from meshtls.policy.renewal import renewal_time

TTL = dt.timedelta(hours=1)
RENEW_AT = 2 / 3  # the default renewAtPercent (66) as the operator resolves it
TARGET = 10_000


def _parse(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def busiest_window(times: list[float], window: float = 60.0) -> int:
    """The most events in any `window` seconds (sliding, not clock-aligned minutes)."""
    s = sorted(times)
    best = j = 0
    for i in range(len(s)):
        while s[i] - s[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


def per_minute(times: list[float], origin: float) -> list[int]:
    if not times:
        return []
    bins = [0] * (int((max(times) - origin) // 60) + 1)
    for t in times:
        bins[int((t - origin) // 60)] += 1
    return bins


FIRST_LOW = 0.1  # the suggested fix: a first renewal uniform in [0.1, 2/3] of the lifetime


def simulate(issued: list[float], hours: float, first_uniform: bool, seed: int = 7,
             first_low: float = FIRST_LOW) -> dict[str, Any]:
    """Rotation times over `hours`, each certificate renewed by the operator's rule (renewal_time with a fresh
    serial as its jitter seed). first_uniform: the suggested fix, a first renewal drawn uniformly in
    [first_low, 2/3] of the lifetime, which spreads a burst over most of one renewal period."""
    rng = random.Random(seed)
    start = min(issued)
    end = start + hours * 3600
    rotations: list[float] = []
    for t in issued:
        first = True
        while True:
            not_after = dt.datetime.fromtimestamp(t, dt.UTC) + TTL
            if first and first_uniform:
                r = t + TTL.total_seconds() * rng.uniform(first_low, RENEW_AT)
            else:
                r = renewal_time(dt.datetime.fromtimestamp(t, dt.UTC), not_after, RENEW_AT,
                                 seed=format(rng.getrandbits(64), "x")).timestamp()
            first = False
            if r > end:
                break
            rotations.append(r)
            t = r
    last_hour = [r for r in rotations if r > end - 3600]
    first_cycle = [r for r in rotations if r < start + TTL.total_seconds()]
    avg_last = len(last_hour) / 60
    mean_period = sum(1 for _ in issued) and (hours * 3600 / max(1, len(rotations) / len(issued))) / 60
    return {
        "first_cycle_busiest_minute": busiest_window(first_cycle),
        "last_hour_busiest_minute": busiest_window(last_hour),
        "last_hour_average_minute": round(avg_last, 1),
        "last_hour_ratio": round(busiest_window(last_hour) / avg_last, 2) if avg_last else None,
        "mean_period_min": round(mean_period, 1),
        "first_cycle_per_minute": per_minute(first_cycle, start),
        "last_hour_per_minute": per_minute(last_hour, end - 3600),
    }


def spread(items: list[dict[str, Any]]) -> dict[str, Any]:
    renew, issued = [], []
    for obj in items:
        st = obj.get("status") or {}
        if not st.get("renewalTime") or not st.get("notBefore"):
            continue
        renew.append(_parse(st["renewalTime"]))
        issued.append(_parse(st["notBefore"]) + DEFAULT_BACKDATE.total_seconds())
    n = len(renew)
    if not n:
        return {}
    periods = [r - i for r, i in zip(renew, issued, strict=True)]
    mean_period_min = sum(periods) / n / 60
    average_minute = n / mean_period_min  # rotations per minute once rotations recur every mean_period
    busiest = busiest_window(renew)
    origin = min(issued)
    current = simulate(issued, 24, first_uniform=False)
    proposed = simulate(issued, 24, first_uniform=True)
    return {
        "identities": n,
        "issued_over_s": round(max(issued) - min(issued), 1),
        "mean_period_min": round(mean_period_min, 2),
        "first_rotation_window_min": round((max(renew) - min(renew)) / 60, 2),
        "average_minute": round(average_minute, 1),
        "busiest_minute": busiest,
        "busiest_to_average": round(busiest / average_minute, 2),
        "first_rotations_per_minute": per_minute(renew, origin),
        "simulated_24h_current_rule": current,
        "simulated_24h_first_renewal_uniform": proposed,
        "first_renewal_uniform_from": round(FIRST_LOW, 3),
    }


def simulate_day(items: list[dict[str, Any]], hours: float = 24, seed: int = 11) -> dict[str, Any]:
    """Every rotation over `hours` from the identities' real first renewal (status.renewalTime, the operator's
    off-schedule rule), each later one by the operator's own `renewal_time` (on schedule, a fresh serial as its
    jitter seed): the busiest minute of the whole day against the day's average minute."""
    rng = random.Random(seed)
    firsts = [(_parse(o["status"]["notBefore"]) + DEFAULT_BACKDATE.total_seconds(), _parse(o["status"]["renewalTime"]))
              for o in items if (o.get("status") or {}).get("renewalTime") and o["status"].get("notBefore")]
    if not firsts:
        return {}
    start = min(i for i, _ in firsts)
    end = start + hours * 3600
    rotations: list[float] = []
    for _, r in firsts:
        while r <= end:
            rotations.append(r)
            issued = dt.datetime.fromtimestamp(r, dt.UTC)
            r = renewal_time(issued, issued + TTL, RENEW_AT, seed=format(rng.getrandbits(64), "x")).timestamp()
    average = len(rotations) / (hours * 60)
    busiest = busiest_window(rotations)
    last_hour = [r for r in rotations if r > end - 3600]
    return {"identities": len(firsts), "rotations": len(rotations), "average_minute": round(average, 1),
            "busiest_minute": busiest, "busiest_to_average": round(busiest / average, 2) if average else None,
            "last_hour_busiest_to_average": round(busiest_window(last_hour) / (len(last_hour) / 60), 2)
            if last_hour else None,
            "per_minute": per_minute(rotations, start)}


def _hold(bench: Bench, keys: list[tuple[str, str]], label: str) -> dict[str, Any]:
    """Create `keys`, wait until all are Ready, let the operator settle; RSS held, then CPU over an idle window."""
    assert bench.operator is not None and bench.operator.proc is not None and bench.tracker is not None
    pid, tracker, knobs = bench.operator.proc.pid, bench.tracker, bench.knobs
    say(f"steady {label}: creating {len(keys)} identities (1 h TTL) in {len({k[0] for k in keys})} namespace(s)")
    t0 = time.time()
    bench.create_identities(keys, {"trustDomain": TRUST_DOMAIN, "ttl": "1h"})
    keyset = set(keys)
    tracker.wait(f"steady {label} Ready", lambda: keyset <= tracker.ready_at.keys(),
                 timeout=max(300, len(keys) * 0.5),
                 progress=lambda: f"{len(keyset & tracker.ready_at.keys())}/{len(keys)} Ready")
    took = max((tracker.ready_at[k] for k in keys if k in tracker.ready_at), default=time.time()) - t0
    time.sleep(10)
    rss_after_burst = rss_bytes(pid)
    watch = CpuWatch({"operator": pid, **bench.component_pids()}).begin()
    load = LoadMeter()
    time.sleep(knobs.idle_seconds)
    cpu = watch.end()
    rss_held = rss_bytes(pid)
    say(f"steady {label}: RSS {rss_held / 2**20:.1f} MB holding {len(keys)} (+ the issuance's); idle CPU "
        f"{cpu['operator'] / knobs.idle_seconds:.4f} cores")
    return {"identities": len(keys), "namespaces": len({k[0] for k in keys}),
            "ready": len(keyset & tracker.ready_at.keys()),
            "identities_per_second": round(len(keys) / took, 1) if took > 0 else None,
            "rss_mb_after_burst": round(rss_after_burst / 2**20, 1), "rss_mb": round(rss_held / 2**20, 1),
            "idle_cpu_cores": round(cpu["operator"] / knobs.idle_seconds, 4), "idle_cpu_seconds": cpu,
            "machine": load.result()}


def _remove_without_revocation(bench: Bench, keys: list[tuple[str, str]]) -> None:
    """With the operator stopped: finalizers stripped, namespaces deleted, waited until gone. Not a revocation
    (section 3 measures that): only room for the next configuration."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.issuance import _wait_gone

    assert bench.rest is not None and bench.operator is not None
    rest = bench.rest
    bench.operator.stop()

    def strip(key: tuple[str, str]) -> None:
        rest.call("PATCH", f"{WID_PATH}/namespaces/{key[0]}/workloadidentities/{key[1]}",
                  {"metadata": {"finalizers": None}}, content_type="application/merge-patch+json", ok=(200, 404))

    say(f"steady: removing {len(keys)} identities without revocation (operator stopped)")
    with ThreadPoolExecutor(bench.knobs.workers) as pool:
        list(pool.map(strip, keys))
    namespaces = sorted({k[0] for k in keys})
    for ns in namespaces:
        rest.call("DELETE", f"/api/v1/namespaces/{ns}", ok=(200, 202, 404))
    for ns in namespaces:
        _wait_gone(bench, ns, timeout=600)


def run(bench: Bench, issuance: dict[str, Any] | None) -> dict[str, Any]:
    """Idle RSS; STEADY_N identities held in one namespace (RSS, idle CPU, the rotation spread over a simulated
    day); then a fresh operator holding STEADY_N spread over 50 namespaces. The issuance section's identities stay
    held throughout (the revocation storm deletes them last)."""
    assert bench.rest is not None and bench.operator is not None and bench.operator.proc is not None
    knobs = bench.knobs
    rss_points: list[tuple[int, int]] = list(getattr(bench, "rss_points", []))
    if not rss_points:
        rss_points.append((0, rss_bytes(bench.operator.proc.pid)))
    idle_mb = rss_points[0][1] / 2**20
    held = len(getattr(bench, "issued_keys", []))
    one_ns = bench.namespace(f"bench-steady-{bench.run_id}")
    keys = [(one_ns, f"wid-{i:05d}") for i in range(knobs.steady_n)]
    one = _hold(bench, keys, "one namespace")
    items = [o for o in bench.rest.get(f"{WID_PATH}/namespaces/{one_ns}/workloadidentities")["items"]]
    rotation = spread(items)
    day = simulate_day(items)
    say(f"steady: simulated day of {day.get('identities')} identities: busiest minute {day.get('busiest_minute')} vs "
        f"average {day.get('average_minute')} ({day.get('busiest_to_average')}x)")
    del items
    _remove_without_revocation(bench, keys)
    bench.start_operator()
    assert bench.operator is not None and bench.operator.proc is not None
    time.sleep(5)
    idle_restarted_mb = rss_bytes(bench.operator.proc.pid) / 2**20
    spread_ns = [bench.namespace(f"bench-steady-{bench.run_id}-{i:02d}") for i in range(50)]
    keys = [(spread_ns[i % 50], f"wid-{i:05d}") for i in range(knobs.steady_n)]
    fifty = _hold(bench, keys, "50 namespaces")
    idle_cores = max(one["idle_cpu_cores"], fifty["idle_cpu_cores"])
    per_issue_s = (issuance or {}).get("meshtls", {}).get("issuer_cpu_ms_per_identity", float("nan")) / 1000
    period_s = rotation.get("mean_period_min", 40) * 60
    rotation_rate = TARGET / period_s
    projected_cores = idle_cores * TARGET / knobs.steady_n + rotation_rate * per_issue_s
    largest = max(one["rss_mb"], fifty["rss_mb"])
    result = {
        "identities": knobs.steady_n,
        "issuance_identities_also_held": held,
        "rss_mb_idle_operator": round(idle_mb, 1),
        "rss_mb_idle_operator_restarted": round(idle_restarted_mb, 1),
        "one_namespace": one,
        "fifty_namespaces": fifty,
        "rss_points": [{"identities": x, "rss_mb": round(y / 2**20, 1)} for x, y in rss_points]
        + [{"identities": held + knobs.steady_n, "rss_mb": one["rss_mb"]}],
        "rss_mb": largest,
        "rss_kb_per_identity": round((one["rss_mb"] - idle_mb) * 1024 / (held + knobs.steady_n), 2),
        "idle_cpu_cores": idle_cores,
        "rotation_rate_per_s_at_10000": round(rotation_rate, 2),
        "cpu_seconds_per_issuance": round(per_issue_s, 4),
        "projected_cpu_cores_at_10000": round(projected_cores, 3),
        "rotation": rotation,
        "simulated_day": day,
        "goals": {  # issue #16's
            "idle_rss_at_most_70_mb": idle_mb <= 70,
            "rss_holding_at_most_150_mb": knobs.steady_n >= TARGET and largest <= 150,
            "busiest_minute_of_a_simulated_day_at_most_1_5x_average": bool(day)
            and (day["busiest_to_average"] or 99) <= 1.5,
        },
    }
    say(f"steady: idle RSS {idle_mb:.1f} MB; holding {knobs.steady_n} (+{held}): {one['rss_mb']} MB in one namespace, "
        f"{fifty['rss_mb']} MB over 50; projected {projected_cores:.3f} cores at 10,000 x 1 h; simulated day "
        f"{day.get('busiest_to_average')}x")
    return result
