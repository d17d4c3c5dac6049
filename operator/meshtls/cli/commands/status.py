"""`meshtls status [NAME]`: the identities table, or one identity with its conditions and recent Events."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from meshtls.api.constants import KIND_WORKLOAD_IDENTITY
from meshtls.cli.commands.cluster import (
    get_identity,
    identity_key,
    list_identities,
    namespace_scope,
    require_namespace,
    utc_now,
)
from meshtls.cli.errors import CommandFailed
from meshtls.cli.output import Output
from meshtls.cli.views.identities import identities_table, identity_detail, identity_detail_data, identity_row
from meshtls.kube.queries import Connection, object_events


def status(args: argparse.Namespace, conn: Connection) -> int:
    kube, out, now = conn.kube, Output(args.output), utc_now()
    namespace = namespace_scope(args, conn)
    if args.name:
        if namespace is None:
            bodies = [b for b in list_identities(kube, None) if b["metadata"]["name"] == args.name]
            if not bodies:
                raise CommandFailed(f"no workloadidentity named {args.name!r} in any namespace")
            if len(bodies) > 1:
                return _print_identities(out, bodies, now)
            body = bodies[0]
        else:
            body = get_identity(kube, namespace, args.name)
        ns, name = identity_key(body)
        events = object_events(kube, ns, name, KIND_WORKLOAD_IDENTITY)
        if out.data:
            out.dump(identity_detail_data(body, events, now, args.events))
        else:
            out.show(identity_detail(body, events, now, args.events))
        return 0
    bodies = list_identities(kube, namespace)
    if not bodies:
        require_namespace(kube, namespace)
    if not bodies and not out.data:
        where = f"namespace {namespace}" if namespace else "any namespace"
        print(f"No WorkloadIdentities found in {where}.", file=sys.stderr)
        return 0
    return _print_identities(out, bodies, now)


def _print_identities(out: Output, bodies: list[dict[str, Any]], now: dt.datetime) -> int:
    rows = sorted((identity_row(b, now) for b in bodies), key=lambda r: (r["namespace"], r["name"]))
    if out.data:
        out.dump({"items": rows})
    else:
        out.show(identities_table(rows, now))
    return 0
