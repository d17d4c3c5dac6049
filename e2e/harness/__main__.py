"""python -m e2e.harness build|up|down|status|env

build   build the pinned binaries that are not cached yet
up      start the local cluster (or reuse a running one); the last line printed is `export KUBECONFIG=...`
down    stop everything `up` started and remove the cluster state
status  show the running cluster's components; exit 1 when none is running or it is unhealthy
env     print `export KUBECONFIG=...` for the running cluster; exit 1 when none is running

Progress goes to stderr, so `eval "$(python -m e2e.harness up)"` works.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from types import FrameType

from . import build, processes
from .cluster import Cluster, HarnessError
from .paths import cache_dir, state_dir


def _export(cluster: Cluster) -> str:
    return f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}"


def cmd_build() -> int:
    start = time.monotonic()
    took = build.build_all()
    built = {name: t for name, t in took.items() if t}
    if built:
        parts = ", ".join(f"{name} {t:.0f} s" for name, t in built.items())
        print(f"built in {time.monotonic() - start:.0f} s ({parts})", file=sys.stderr)
    for c in build.COMPONENTS:
        print(f"{c.name} {c.version}: {c.bin_dir}")
    return 0


def cmd_up() -> int:
    start = time.monotonic()
    cluster = Cluster.start()
    print(
        f"cluster up in {time.monotonic() - start:.1f} s; kubeconfig: {cluster.kubeconfig}", file=sys.stderr
    )
    print(_export(cluster))
    return 0


def cmd_down() -> int:
    print("cluster stopped" if Cluster.down() else "no cluster was running", file=sys.stderr)
    return 0


def cmd_status() -> int:
    cluster = Cluster.running()
    if cluster is None:
        print(f"no healthy cluster (state dir: {state_dir()})")
        return 1
    print(f"api server: {cluster.api_server_url}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    print(f"logs:       {cluster.logs_dir}")
    for p in cluster.processes:
        print(f"  {p.name:<24} pid {p.pid:<8} {'running' if processes.alive(p.pid) else 'EXITED'}")
    for c in build.COMPONENTS:
        print(f"  {c.name} {c.version}: {c.bin_dir}{'' if c.is_built() else ' (not built)'}")
    return 0


def cmd_env() -> int:
    cluster = Cluster.running()
    if cluster is None:
        print("no healthy cluster is running: start one with `python -m e2e.harness up`", file=sys.stderr)
        return 1
    print(_export(cluster))
    return 0


COMMANDS = {"build": cmd_build, "up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.harness",
        description=f"Local Kubernetes control plane (cache: {cache_dir()}, state: {state_dir()})",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS)
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # a half-started cluster is then stopped, a half-done build removed

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        return COMMANDS[args.command]()
    except (HarnessError, build.BuildError, processes.ComponentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
