"""Kubernetes Events as rows, a table (`status NAME`) and one-line stream entries (`watch`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from meshtls.api.names import iso
from meshtls.api.reasons import Reason
from meshtls.cli.output import new_table
from meshtls.cli.views.times import ago, parse_time


def event_time(event: Mapping[str, Any]) -> dt.datetime:
    """When it last happened: lastTimestamp, else eventTime, firstTimestamp, creationTimestamp."""
    for value in (event.get("lastTimestamp"), event.get("eventTime"), event.get("firstTimestamp"),
                  (event.get("metadata") or {}).get("creationTimestamp")):
        t = parse_time(value)
        if t is not None:
            return t
    return dt.datetime.min.replace(tzinfo=dt.UTC)


def sorted_events(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(events, key=lambda e: (event_time(e), (e.get("metadata") or {}).get("resourceVersion") or ""))


def event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    involved = event.get("involvedObject") or {}
    return {
        "time": iso(event_time(event)),
        "namespace": involved.get("namespace") or (event.get("metadata") or {}).get("namespace"),
        "name": involved.get("name"),
        "kind": involved.get("kind"),
        "type": event.get("type"),
        "reason": event.get("reason"),
        "message": event.get("message"),
        "count": event.get("count") or 1,
    }


def _reason_style(row: Mapping[str, Any]) -> str:
    if row.get("type") == "Warning":
        return "bold red"
    styles: dict[str, str] = {Reason.ISSUED: "green", Reason.ROTATED: "cyan", Reason.REVOKED: "magenta",
                              Reason.REPAIRED: "yellow"}
    return styles.get(str(row.get("reason")), "")


def events_table(rows: Sequence[Mapping[str, Any]], now: dt.datetime) -> Table:
    table = new_table(("LAST SEEN", "TYPE", "REASON", "MESSAGE"))
    for row in rows:
        table.add_row(Text(ago(parse_time(row["time"]), now)), Text(str(row.get("type") or "")),
                      Text(str(row.get("reason") or ""), style=_reason_style(row)), Text(str(row.get("message") or "")))
    return table


def watch_line(row: Mapping[str, Any]) -> Text:
    """`meshtls watch`: time, namespace/name, reason, message on one line."""
    text = Text()
    text.append(str(row.get("time") or "-"), style="dim")
    text.append("  ")
    text.append(f"{row.get('namespace')}/{row.get('name')}", style="bold")
    text.append("  ")
    text.append(str(row.get("reason") or ""), style=_reason_style(row))
    text.append("  ")
    text.append(" ".join(str(row.get("message") or "").split()))
    return text
