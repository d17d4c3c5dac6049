"""`meshtls watch`: meshtls Events as they happen, one line each."""

from __future__ import annotations

import argparse
import os
import sys

from meshtls.api.constants import KIND_WORKLOAD_IDENTITY
from meshtls.api.reasons import WATCHED_REASONS
from meshtls.cli.commands.cluster import namespace_scope, require_namespace
from meshtls.cli.output import Output
from meshtls.cli.views.events import event_row, watch_line
from meshtls.kube.queries import Connection, watch_events


def watch(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    namespace = namespace_scope(args, conn)
    require_namespace(kube, namespace)
    reasons = set(args.reason or WATCHED_REASONS)
    if args.reason is None:
        selector: str | None = f"involvedObject.kind={KIND_WORKLOAD_IDENTITY}"
    else:
        selector = f"reason={args.reason[0]}" if len(reasons) == 1 else None
    if not out.data:
        where = f"namespace {namespace}" if namespace else "all namespaces"
        print(f"watching {', '.join(sorted(reasons))} Events in {where}; Ctrl-C to stop", file=sys.stderr,
              flush=True)
    try:
        for _type, event in watch_events(kube, namespace, selector):
            if event.get("reason") not in reasons:
                continue
            row = event_row(event)
            out.line(row, watch_line(row))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `meshtls watch | head`
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 0
    return 0
