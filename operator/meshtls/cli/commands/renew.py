"""`meshtls renew NAME | --all`: ask the operator for a new certificate now, and wait until it is issued."""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from rich.text import Text

from meshtls.api.constants import ANNOTATION_RENEW
from meshtls.cli.commands.cluster import (
    get_identity,
    identity_key,
    list_identities,
    namespace_scope,
    poll_identities,
    print_rows,
    require_namespace,
    timeout_seconds,
    utc_now,
    waited_too_long,
)
from meshtls.cli.errors import CommandFailed
from meshtls.cli.output import Output
from meshtls.kube.queries import Connection


def renew(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    timeout = timeout_seconds(args)
    namespace = namespace_scope(args, conn)
    if args.name:  # validate() made sure a NAME comes with a namespace
        targets = [get_identity(kube, str(namespace), args.name)]
    else:
        targets = [b for b in list_identities(kube, namespace) if not b["metadata"].get("deletionTimestamp")]
        if not targets:
            require_namespace(kube, namespace)
            raise CommandFailed(f"no WorkloadIdentities in {f'namespace {namespace}' if namespace else 'the cluster'}")
    request = f"{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    started = time.monotonic()
    for body in targets:
        key = identity_key(body)
        kube.patch_workload_identity_annotations(*key, {ANNOTATION_RENEW: request})
        pending[key] = {"namespace": key[0], "name": key[1], "request": request,
                        "oldSerial": (body.get("status") or {}).get("serialNumber")}
    if not args.wait:
        return print_rows(out, list(pending.values()), lambda r: Text(
            f"renewal requested for {r['namespace']}/{r['name']} (request {request})"))
    done: list[dict[str, Any]] = []
    for body in poll_identities(kube, set(pending), timeout, lambda b: (b.get("status") or {}).get("lastRenewRequest")
                      == request):
        result = pending.pop(identity_key(body))
        status_ = body.get("status") or {}
        result.update(newSerial=status_.get("serialNumber"), notAfter=status_.get("notAfter"),
                      seconds=round(time.monotonic() - started, 3))
        done.append(result)
        if not out.data:
            out.show(Text(f"{result['namespace']}/{result['name']} renewed in {result['seconds']:.2f} s: serial "
                          f"{result['oldSerial'] or '-'} -> {result['newSerial']} (notAfter {result['notAfter']})"))
    if out.data:
        out.dump({"items": done + [{**p, "newSerial": None, "timedOut": True} for p in pending.values()]})
    if pending:
        raise CommandFailed(waited_too_long(kube, pending, timeout, "renew"))
    return 0
