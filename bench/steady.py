"""Section 2: the operator holding many identities with 1 h certificates: memory, idle CPU, rotation spread.

Measured: operator RSS with 0, N and STEADY_N identities (a line through them extrapolates to 10,000), its CPU over
an idle window at STEADY_N, and every identity's status.renewalTime (the first rotation of each, without waiting an
hour). The steady CPU at 10,000 x 1 h adds the rotation rate times the CPU one issuance cost in section 1 (a
rotation runs the same reconcile plus one GET of the identity). Later rotation cycles are simulated with the
operator's own pure renewal function, so the report shows whether the spread improves with time.
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


def run(bench: Bench, issuance: dict[str, Any] | None) -> dict[str, Any]:
    assert bench.rest is not None and bench.operator is not None and bench.operator.proc is not None
    assert bench.tracker is not None
    pid = bench.operator.proc.pid
    knobs = bench.knobs
    rss_points: list[tuple[int, int]] = list(getattr(bench, "rss_points", []))
    held = len(getattr(bench, "issued_keys", []))
    rss_points.append((held, rss_bytes(pid)))
    extra = max(0, knobs.steady_n - held)
    ns = bench.namespace(f"bench-steady-{bench.run_id}")
    keys = [(ns, f"wid-{i:05d}") for i in range(extra)]
    tracker = bench.tracker
    say(f"steady: adding {extra} identities (1 h TTL) to the {held} held, in {ns}")
    t0 = time.time()
    bench.create_identities(keys, {"trustDomain": TRUST_DOMAIN, "ttl": "1h"})
    keyset = set(keys)
    tracker.wait("steady Ready", lambda: keyset <= tracker.ready_at.keys(), timeout=max(300, extra * 0.5),
                 progress=lambda: f"{len(keyset & tracker.ready_at.keys())}/{extra} Ready")
    took = max((tracker.ready_at[k] for k in keys if k in tracker.ready_at), default=time.time()) - t0
    time.sleep(5)
    total = held + extra
    rss_points.append((total, rss_bytes(pid)))
    say(f"steady: {total} identities held; idle CPU over {knobs.idle_seconds} s")
    watch = CpuWatch({"operator": pid, **bench.component_pids()}).begin()
    load = LoadMeter()
    time.sleep(knobs.idle_seconds)
    cpu = watch.end()
    machine = load.result()
    rss_points.append((total, rss_bytes(pid)))
    items = [o for o in bench.rest.get(f"{WID_PATH}/workloadidentities")["items"]
             if (o.get("spec") or {}).get("trustDomain") == TRUST_DOMAIN]
    rotation = spread(items)
    # RSS right after a burst of issuance carries the burst's high-water heap, so a line through 0 overstates the
    # cost of holding; the marginal cost from N to STEADY_N (both after a burst) is the per-identity figure
    xs = [p[0] for p in rss_points]
    ys = [p[1] / 2**20 for p in rss_points]
    first_held = next((y for x, y in zip(xs, ys, strict=True) if x == held), ys[0])
    last = ys[-1]
    slope = (last - first_held) / (total - held) if total > held else 0.0
    at_target = last + slope * (TARGET - total)
    through_zero = (last - ys[0]) / total if total else 0.0
    idle_cores = cpu["operator"] / knobs.idle_seconds
    per_issue_s = (issuance or {}).get("meshtls", {}).get("issuer_cpu_ms_per_identity", float("nan")) / 1000
    period_s = rotation.get("mean_period_min", 40) * 60
    rotation_rate = TARGET / period_s
    projected_cores = idle_cores * TARGET / total + rotation_rate * per_issue_s
    result = {
        "identities": total,
        "added": extra,
        "added_identities_per_second": round(extra / took, 1) if extra and took > 0 else None,
        "rss_points": [{"identities": x, "rss_mb": round(y, 1)} for x, y in zip(xs, ys, strict=True)],
        "rss_mb": round(ys[-1], 1),
        "rss_mb_idle_operator": round(ys[0], 1),
        "rss_kb_per_identity": round(slope * 1024, 2),
        "rss_kb_per_identity_through_zero": round(through_zero * 1024, 2),
        "rss_mb_at_10000": round(at_target, 1),
        "rss_mb_at_10000_through_zero": round(ys[0] + through_zero * TARGET, 1),
        "idle_cpu_cores": round(idle_cores, 4),
        "idle_cpu_seconds": cpu,
        "machine": machine,
        "rotation_rate_per_s_at_10000": round(rotation_rate, 2),
        "cpu_seconds_per_issuance": round(per_issue_s, 4),
        "projected_cpu_cores_at_10000": round(projected_cores, 3),
        "rotation": rotation,
        "goals": {
            "rss_at_10000_at_most_150_mb": at_target <= 150,
            "busiest_minute_at_most_2x_average": bool(rotation) and rotation["busiest_to_average"] <= 2,
        },
    }
    say(f"steady: RSS {result['rss_mb']} MB at {total} ({result['rss_kb_per_identity']} KiB/identity, "
        f"~{result['rss_mb_at_10000']} MB at 10,000); idle CPU {idle_cores:.3f} cores; projected "
        f"{projected_cores:.3f} cores at 10,000 x 1 h; busiest minute {rotation.get('busiest_minute')} vs average "
        f"{rotation.get('average_minute')} ({rotation.get('busiest_to_average')}x)")
    return result
