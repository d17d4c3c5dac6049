"""Section 1: N WorkloadIdentities applied at once, meshtls vs the floor (a minimal issuer), same run.

Per side: identities/s from the first POST to the last Ready (seen on a watch), creation->Ready latency per object
(POST returned -> watch event with Ready=True), API requests per identity from the apiserver's
apiserver_request_total (minus the bench's own POSTs), CPU seconds of the issuer, kube-apiserver and etcd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    CpuWatch,
    LoadMeter,
    Profiler,
    diff_counts,
    pct,
    request_counts,
    rss_bytes,
    say,
    split_rw,
)
from bench.context import TRUST_DOMAIN, Bench

RESOURCES = {"workloadidentities", "secrets", "configmaps", "events", "trustdomains", "namespaces",
             "kopfpeerings", "clusterkopfpeerings"}


def measure(bench: Bench, label: str, issuer_pid: int, keys: list[tuple[str, str]], spec: dict[str, Any],
            trust_domain: str, profile: Path | None = None) -> dict[str, Any]:
    assert bench.rest is not None and bench.tracker is not None
    tracker = bench.tracker
    n = len(keys)
    before = request_counts(bench.rest)
    watch = CpuWatch({"issuer": issuer_pid, **bench.component_pids(), "bench": os.getpid()}).begin()
    load = LoadMeter()
    spy = Profiler(issuer_pid, profile) if profile else None
    say(f"{label}: creating {n} WorkloadIdentities from {bench.knobs.workers} threads")
    t0 = time.time()
    created = bench.create_identities(keys, spec)
    t_created = time.time()
    say(f"{label}: {n} created in {t_created - t0:.1f} s; waiting for Ready")
    keyset = set(keys)
    ok = tracker.wait(f"{label} Ready", lambda: keyset <= tracker.ready_at.keys(), timeout=max(300, n * 0.5),
                      progress=lambda: f"{len(keyset & tracker.ready_at.keys())}/{n} Ready")
    t_end = max((tracker.ready_at[k] for k in keys if k in tracker.ready_at), default=time.time())
    if spy is not None:
        spy.stop()
    time.sleep(2)  # stragglers: Events are posted after the status
    after = request_counts(bench.rest)
    cpu = watch.end()
    machine = load.result()
    delta = diff_counts(after, before, RESOURCES)
    own = delta.get("POST workloadidentities", 0)
    delta["POST workloadidentities"] = own - n  # the bench's own creations
    delta = {k: v for k, v in delta.items() if v}
    reads, writes = split_rw(delta)
    # kube-controller-manager's garbage collector GETs the owner of every new owned Secret (the floor shows the
    # same); the issuer never GETs an identity on this path
    gc_reads = delta.get("GET workloadidentities", 0)
    ready = [k for k in keys if k in tracker.ready_at]
    latencies = [tracker.ready_at[k] - created[k] for k in ready]
    timeline = sorted(tracker.ready_at[k] - t0 for k in ready)
    duration = t_end - t0
    secrets = bench.verify_secrets(keys, trust_domain)
    result = {
        "identities": n,
        "ready": len(ready),
        "completed": ok,
        "seconds": round(duration, 3),
        "create_seconds": round(t_created - t0, 3),
        "identities_per_second": round(len(ready) / duration, 1) if duration > 0 else None,
        "latency_p50_s": round(pct(latencies, 50), 3),
        "latency_p99_s": round(pct(latencies, 99), 3),
        "latency_max_s": round(max(latencies, default=float("nan")), 3),
        "api_requests": delta,
        "reads_per_identity": round((reads - gc_reads) / n, 2),
        "reads_per_identity_raw": round(reads / n, 2),
        "gc_owner_gets": gc_reads,
        "writes_per_identity": round(writes / n, 2),
        "cpu_seconds": cpu,
        "issuer_cpu_ms_per_identity": round(cpu["issuer"] / n * 1000, 2),
        "control_plane_cpu_ms_per_identity": round((cpu.get("kube-apiserver", 0) + cpu.get("etcd", 0)) / n * 1000,
                                                   2),
        # what the machine could do if nothing else ran: cores / CPU spent per identity by everyone involved
        "cpu_bound_ceiling_per_s": round((os.cpu_count() or 1) / (sum(cpu.values()) / n), 1) if sum(cpu.values())
        else None,
        "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in watch.peak_rss.items()},
        "secrets": secrets,
        "machine": machine,
        "timeline_s": [round(t, 3) for t in timeline],
        "latencies_s": [round(x, 3) for x in latencies],
    }
    say(f"{label}: {len(ready)}/{n} Ready in {duration:.1f} s = {result['identities_per_second']} identities/s, "
        f"p50 {result['latency_p50_s']:.2f} s p99 {result['latency_p99_s']:.2f} s, "
        f"{result['reads_per_identity']} reads + {result['writes_per_identity']} writes per identity, "
        f"issuer CPU {cpu['issuer']:.1f} s; secrets {secrets}")
    return result


def run_floor(bench: Bench) -> dict[str, Any]:
    assert bench.cluster is not None
    n = bench.knobs.n
    ns = bench.namespace(f"bench-floor-{bench.run_id}")
    say(f"floor: starting the minimal issuer for {n} identities in {ns}")
    log = (bench.out / "floor.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "--kubeconfig", str(bench.cluster.kubeconfig),
                             "--namespace", ns, "--workers", str(bench.knobs.workers), "--expect", str(n)],
                            stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "watching" not in line:
        raise RuntimeError(f"the floor issuer did not start: {line!r}; see {bench.out / 'floor.log'}")
    try:
        keys = [(ns, f"wid-{i:05d}") for i in range(n)]
        result = measure(bench, "floor", proc.pid, keys, {"trustDomain": "floor.meshtls.test"}, "floor.meshtls.test")
    finally:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    result["namespace"] = ns
    return result


def run_meshtls(bench: Bench) -> dict[str, Any]:
    assert bench.operator is not None and bench.operator.proc is not None
    n = bench.knobs.n
    namespaces = [bench.namespace(f"bench-issue-{bench.run_id}-{i}") for i in range(bench.knobs.namespaces)]
    keys = [(namespaces[i % len(namespaces)], f"wid-{i:05d}") for i in range(n)]
    metrics_before = bench.operator.metrics()
    result = measure(bench, "meshtls", bench.operator.proc.pid, keys, {"trustDomain": TRUST_DOMAIN}, TRUST_DOMAIN,
                     profile=bench.out / "operator-issuance.pyspy.txt")
    result["namespaces"] = namespaces
    # the operator's own count (meshtls_api_requests_total): its reads apart from the garbage collector's, the GETs
    # of the request-race fix (an event that waited on the lock) included
    own = operator_requests(bench.operator.metrics())
    own_before = operator_requests(metrics_before)
    delta = {k: v - own_before.get(k, 0) for k, v in own.items() if v - own_before.get(k, 0)}
    result["operator_requests"] = delta
    result["operator_reads_per_identity"] = round(sum(v for k, v in delta.items() if k.startswith("GET ")) / n, 3)
    result["operator_identity_gets"] = delta.get("GET workloadidentities", 0)
    result["operator_writes_per_identity"] = round(
        sum(v for k, v in delta.items() if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE")) / n, 3)
    result["operator_metrics_before"] = _issued(metrics_before)
    result["operator_metrics_after"] = _issued(bench.operator.metrics())
    bench.issued_keys = keys  # type: ignore[attr-defined]
    return result


def operator_requests(text: str) -> dict[str, int]:
    """meshtls_api_requests_total by "VERB resource" outside the operator's namespace, from its /metrics."""
    import re

    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("meshtls_api_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
            if labels.get("scope") != "operator":  # the trust domains' state in its own namespace, polled
                key = f"{labels['verb']} {labels['resource']}"
                out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def _issued(text: str) -> dict[str, float]:
    from bench.common import prom_value

    return {name: prom_value(text, name) for name in ("meshtls_certificates_issued_total",
                                                      "meshtls_issuance_failures_total",
                                                      "meshtls_crl_publications_total")}


def run(bench: Bench) -> dict[str, Any]:
    floor = run_floor(bench)
    # the floor's objects are done with; removing them now keeps them out of the operator's start-up
    assert bench.rest is not None
    bench.rest.call("DELETE", f"/api/v1/namespaces/{floor['namespace']}", ok=(200, 202, 404))
    _wait_gone(bench, floor["namespace"])
    bench.start_operator()
    bench.trust_domain()
    time.sleep(2)
    assert bench.operator is not None and bench.operator.proc is not None
    bench.rss_points = [(0, rss_bytes(bench.operator.proc.pid))]  # type: ignore[attr-defined]
    meshtls = run_meshtls(bench)
    floor_rate = floor.get("identities_per_second") or 0
    mesh_rate = meshtls.get("identities_per_second") or 0
    summary = {
        "identities_per_second": mesh_rate,
        "floor_identities_per_second": floor_rate,
        "ratio_to_floor": round(mesh_rate / floor_rate, 3) if floor_rate else None,
        "writes_per_identity": meshtls["writes_per_identity"],
        "reads_per_identity": meshtls["reads_per_identity"],
        "operator_cpu_ms_per_identity": meshtls["issuer_cpu_ms_per_identity"],
        "goals": {  # issue #16's
            "at_most_3_writes_per_issuance": meshtls["writes_per_identity"] <= 3,
            # the operator's own GETs (its counter): a few per namespace (its bundle, the overlap listing), none per
            # identity; the API server also counts kube-controller-manager's GC reading each new Secret's owner
            "no_read_per_issuance": meshtls["operator_reads_per_identity"] <= 0.01,
            "cpu_at_most_4ms_per_issuance": meshtls["issuer_cpu_ms_per_identity"] <= 4,
            "at_least_0_9_of_the_floor": bool(floor_rate) and mesh_rate >= 0.9 * floor_rate,
        },
    }
    return {"meshtls": meshtls, "floor": floor, "summary": summary}


def _wait_gone(bench: Bench, ns: str, timeout: float = 120) -> None:
    assert bench.rest is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = bench.rest.call("GET", f"/api/v1/namespaces/{ns}", ok=(200, 404))
        if status == 404:
            return
        time.sleep(0.5)
    say(f"namespace {ns} still terminating after {timeout:.0f} s; going on")
