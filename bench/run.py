"""`python -m bench.run` (`make bench`): every section against the local real control plane, then the report.

Knobs (environment):
  MESHTLS_BENCH_SMALL=1 (or MESHTLS_BENCH_SMOKE=1)  CI smoke size (N=50, small data plane; < 3 minutes)
  MESHTLS_BENCH_N=1000            identities issued at once, floor objects, revocation storm
  MESHTLS_BENCH_STEADY_N=10000    identities held in the steady-state section (once in one namespace, once over 50)
  MESHTLS_BENCH_NAMESPACES=4      namespaces the issuance batch spreads over (one trust bundle each)
  MESHTLS_BENCH_WORKERS=16        client threads (and the floor's workers)
  MESHTLS_BENCH_IDLE_SECONDS=60   steady-state CPU window
  MESHTLS_BENCH_DP_MIB=2048 MESHTLS_BENCH_DP_HANDSHAKES=3000 MESHTLS_BENCH_DP_RATE=1000 MESHTLS_BENCH_DP_SECONDS=15
  MESHTLS_BENCH_SECTIONS=issuance,steady,revocation,dataplane   a subset
  MESHTLS_BENCH_DP_BASELINE=REV   also run meshtls-proxy as it was at git REV in the data-plane section (before/after)
  MESHTLS_BENCH_OUT=DIR           where results go (default bench/results/<timestamp>)
  MESHTLS_BENCH_PYSPY=1           profile the operator during issuance with py-spy (if installed)
  MESHTLS_CLUSTER_DIR             the control plane's state dir (default: a bench-only dir in the cache, so a
                                  cluster of the e2e tests is never reused or disturbed)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import Knobs, say

REPO = Path(__file__).resolve().parents[1]


def _out_dir() -> Path:
    if os.environ.get("MESHTLS_BENCH_OUT"):
        out = Path(os.environ["MESHTLS_BENCH_OUT"])
    else:
        out = REPO / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "operator_changes_not_committed": git("status", "--short", "operator").splitlines(),
            "cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    knobs = Knobs.from_env()
    out = _out_dir()
    if not os.environ.get("MESHTLS_CLUSTER_DIR"):
        from e2e.harness.paths import cache_dir

        os.environ["MESHTLS_CLUSTER_DIR"] = str(cache_dir() / "bench-cluster")
    say(f"results -> {out}")
    say(f"knobs: {knobs}")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": _machine(),
                               "knobs": {k: v for k, v in vars(knobs).items()}, "errors": {}}
    t0 = time.monotonic()
    cluster_sections = [s for s in ("issuance", "steady", "revocation") if s in knobs.sections]
    if cluster_sections:
        from bench import issuance, revocation, steady
        from bench.context import Bench

        bench = Bench(knobs, out)
        try:
            bench.start_cluster()
            if "issuance" in knobs.sections:
                results["issuance"] = issuance.run(bench)
            else:
                bench.start_operator()
                bench.trust_domain()
            if "steady" in knobs.sections:
                results["steady"] = steady.run(bench, results.get("issuance"))
            if "revocation" in knobs.sections:
                results["revocation"] = revocation.run(bench)
        except Exception as exc:
            traceback.print_exc()
            results["errors"]["cluster"] = f"{type(exc).__name__}: {exc}"
        finally:
            if bench.operator is not None:
                results["operator_log_errors"] = _log_errors(bench.operator.log_path)
            bench.stop()
    if "dataplane" in knobs.sections:
        from bench import dataplane

        try:
            results["dataplane"] = dataplane.run(knobs, out)
        except Exception as exc:
            traceback.print_exc()
            results["errors"]["dataplane"] = f"{type(exc).__name__}: {exc}"
    results["seconds"] = round(time.monotonic() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False))
    from bench import report

    report.write(results, out)
    say(f"done in {results['seconds']:.0f} s: {out / 'report.md'}")
    if results["errors"]:
        say(f"errors: {results['errors']}")
        return 1
    return 0


def _log_errors(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line or "[ERROR" in line]
    return {"count": len(errors), "first": errors[:5]}


if __name__ == "__main__":
    sys.exit(main())
