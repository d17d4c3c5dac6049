"""What every cluster command shares: the connection, input checks before any call, reading identities, waiting
for the operator. Bad input and an unreachable cluster end in one line on stderr and a non-zero exit (2 for bad
input, 1 otherwise), never a traceback."""

from __future__ import annotations

import argparse
import datetime as dt
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from rich.text import Text

from meshtls.api.constants import DEFAULT_BUNDLE_CONFIGMAP
from meshtls.api.durations import parse_duration
from meshtls.api.model import SpecError, parse_trust_domain
from meshtls.cli.errors import CommandFailed, UsageError
from meshtls.cli.output import Output
from meshtls.cli.views.identities import condition
from meshtls.kube.client import ApiError, Kube, NotFound
from meshtls.kube.queries import Connection, KubeconfigError, connect_cli, connection_problem
from meshtls.pki import PKIError, RevocationReason

POLL = 0.2  # seconds between reads while waiting for the operator

Command = Callable[[argparse.Namespace, Connection], int]


def connect(args: argparse.Namespace) -> Connection:
    try:
        return connect_cli(args.kubeconfig, args.context)
    except KubeconfigError as exc:
        raise UsageError(exc.field, exc.message) from None


def validate(args: argparse.Namespace) -> None:
    """Bad input fails (exit 2) before any cluster call."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and parse_duration(str(timeout), "--timeout").total_seconds() <= 0:
        raise UsageError("--timeout", "must be positive")
    if args.command == "renew":
        if bool(args.name) == bool(args.all):
            raise UsageError("NAME", "give one identity's NAME or --all")
        if args.name and args.all_namespaces:
            raise UsageError("-A", "renewing one NAME needs its namespace (-n), or use --all")
    if args.command == "revoke":
        RevocationReason.parse(args.reason, "--reason")
    if args.command == "status" and args.events < 0:
        raise UsageError("--events", "must be 0 or more")


def with_cluster(args: argparse.Namespace, fn: Command) -> int:
    validate(args)
    conn = connect(args)
    try:
        return fn(args, conn)
    except (UsageError, CommandFailed, PKIError, KeyboardInterrupt, SystemExit):
        raise
    except ApiError as exc:
        raise CommandFailed(f"the API server at {conn.server} refused: {exc}") from None
    except NotFound as exc:
        raise CommandFailed(f"not found: {exc}") from None
    except Exception as exc:
        problem = connection_problem(exc)
        if problem is None:
            raise
        raise CommandFailed(f"cannot reach the Kubernetes API at {conn.server}: {problem}") from None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def timeout_seconds(args: argparse.Namespace) -> float:
    return parse_duration(str(args.timeout), "--timeout").total_seconds()


def namespace_scope(args: argparse.Namespace, conn: Connection) -> str | None:
    """None for -A; else -n, else the kubeconfig context's namespace."""
    if getattr(args, "all_namespaces", False):
        return None
    return str(args.namespace or conn.namespace)


def require_namespace(kube: Kube, namespace: str | None) -> None:
    if namespace and not kube.namespace_exists(namespace):
        raise CommandFailed(f"namespace {namespace!r} not found")


def list_identities(kube: Kube, namespace: str | None) -> list[dict[str, Any]]:
    try:
        return kube.list_workload_identities(namespace)
    except NotFound:
        raise CommandFailed("the WorkloadIdentity CRD is not installed on this cluster "
                            "(kubectl apply -f crds/, or install the Helm chart)") from None


def get_identity(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    try:
        body = kube.get_workload_identity(namespace, name)
    except NotFound:
        body = None
    if body is None:
        list_identities(kube, namespace)  # a missing CRD says so
        require_namespace(kube, namespace)
        raise CommandFailed(f"workloadidentity {namespace}/{name} not found")
    return body


def bundle_name_of(kube: Kube, trust_domain: str | None) -> str:
    if not trust_domain:
        return DEFAULT_BUNDLE_CONFIGMAP
    try:
        body = kube.get_trust_domain(trust_domain)
    except (NotFound, ApiError):
        body = None
    try:  # the operator's reading of the spec, defaults and all
        return parse_trust_domain(body).bundle_configmap if body else DEFAULT_BUNDLE_CONFIGMAP
    except SpecError:  # the operator refuses it too: it publishes no bundle under another name
        return DEFAULT_BUNDLE_CONFIGMAP


def identity_key(body: Mapping[str, Any]) -> tuple[str, str]:
    return str(body["metadata"]["namespace"]), str(body["metadata"]["name"])


def print_rows(out: Output, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], Text]) -> int:
    if out.data:
        out.dump({"items": rows})
    else:
        for r in rows:
            out.show(line(r))
    return 0


def poll_identities(kube: Kube, keys: set[tuple[str, str]], timeout: float,
          done: Callable[[dict[str, Any]], bool]) -> Iterator[dict[str, Any]]:
    """Yield each identity's body once `done(body)` holds, reading every POLL seconds until `timeout`."""
    left = set(keys)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        namespaces = {ns for ns, _ in left}
        if len(left) == 1:
            ns, name = next(iter(left))
            found = [b] if (b := kube.get_workload_identity(ns, name)) else []
        elif len(namespaces) == 1:
            found = kube.list_workload_identities(next(iter(namespaces)))
        else:
            found = kube.list_workload_identities(None)
        for body in found:
            key = identity_key(body)
            if key in left and done(body):
                left.discard(key)
                yield body
        missing = left - {identity_key(b) for b in found}
        if missing:
            raise CommandFailed(f"workloadidentity {'/'.join(sorted(missing)[0])} was deleted while waiting")
        if left:
            time.sleep(POLL)


def waited_too_long(kube: Kube, pending: Mapping[tuple[str, str], Any], timeout: float, what: str) -> str:
    names = ", ".join(f"{ns}/{n}" for ns, n in sorted(pending)[:5]) + (" ..." if len(pending) > 5 else "")
    hint = "is the operator running? (meshtls check)"
    ns, name = sorted(pending)[0]
    body = kube.get_workload_identity(ns, name) or {}
    ready = condition(body, "Ready")
    if ready and ready.get("status") != "True":
        hint = f"{ns}/{name} is not Ready: {ready.get('reason')}: {ready.get('message')}"
    return f"timed out after {timeout:.0f} s waiting for the operator to {what} {names}; {hint}"
