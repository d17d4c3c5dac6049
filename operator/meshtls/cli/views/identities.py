"""WorkloadIdentities as the CLI shows them: rows from resource bodies, the `status` table and one identity's
detail. No API calls: every function takes plain dicts (the API's camelCase JSON) and a `now`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from meshtls.api.names import default_secret_name
from meshtls.cli.output import new_table
from meshtls.cli.views.events import event_row, events_table, sorted_events
from meshtls.cli.views.times import ago, human_duration, parse_time, seconds_until

IDENTITY_COLUMNS = ("NAMESPACE", "NAME", "SPIFFE ID", "READY", "SERIAL", "EXPIRES IN", "RENEWS IN", "ROTATIONS",
                    "LAST ROTATION")



def secret_name_of(body: Mapping[str, Any]) -> str:
    """The identity's Secret: the one it was issued into, else the one its spec names, else the default."""
    return str((body.get("status") or {}).get("secretName") or (body.get("spec") or {}).get("secretName")
               or default_secret_name(str((body.get("metadata") or {}).get("name"))))


def condition(body: Mapping[str, Any], type_: str) -> dict[str, Any]:
    for c in (body.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def identity_row(body: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """One identity as data: what the table shows, plus the raw timestamps and seconds for -o json."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    ready = condition(body, "Ready")
    not_after = parse_time(status.get("notAfter"))
    renewal = parse_time(status.get("renewalTime"))
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "spiffeID": status.get("spiffeID"),
        "trustDomain": status.get("trustDomain") or (body.get("spec") or {}).get("trustDomain"),
        "secretName": secret_name_of(body),
        "dataPlane": status.get("dataPlane"),  # the sidecar its pods run (None: no sidecar routes)
        "ready": ready.get("status", "Unknown"),
        "reason": ready.get("reason"),
        "message": ready.get("message"),
        "serial": status.get("serialNumber"),
        "notBefore": status.get("notBefore"),
        "notAfter": status.get("notAfter"),
        "expiresInSeconds": seconds_until(not_after, now),
        "renewalTime": status.get("renewalTime"),
        "renewsInSeconds": seconds_until(renewal, now),
        "rotations": int(status.get("rotations") or 0),
        "lastRotationTime": status.get("lastRotationTime"),
        "lastRenewRequest": status.get("lastRenewRequest"),
        "deleting": bool(meta.get("deletionTimestamp")),
    }


def ready_cell(row: Mapping[str, Any]) -> Text:
    if row["ready"] == "True":
        return Text("True", style="green")
    if row["ready"] == "False":
        return Text(f"False ({row['reason']})" if row.get("reason") else "False", style="bold red")
    return Text(str(row["ready"]), style="yellow")


def _expires_cell(row: Mapping[str, Any]) -> Text:
    left = row.get("expiresInSeconds")
    if left is None:
        return Text("-")
    if left <= 0:
        return Text(f"expired {human_duration(dt.timedelta(seconds=-left))} ago", style="bold red")
    return Text(human_duration(dt.timedelta(seconds=left)))


def _renews_cell(row: Mapping[str, Any]) -> Text:
    left = row.get("renewsInSeconds")
    if left is None:
        return Text("-")
    if left < -5:  # the operator renews at the renewal time: more than a few seconds late means it is not running
        return Text(f"overdue {human_duration(dt.timedelta(seconds=-left))}", style="yellow")
    return Text(human_duration(dt.timedelta(seconds=max(left, 0))))


def identities_table(rows: Sequence[Mapping[str, Any]], now: dt.datetime) -> Table:
    table = new_table(IDENTITY_COLUMNS)
    for row in rows:
        last = parse_time(row.get("lastRotationTime"))
        table.add_row(
            Text(str(row["namespace"])), Text(str(row["name"]), style="bold"), Text(row.get("spiffeID") or "-"),
            ready_cell(row), Text(row.get("serial") or "-"), _expires_cell(row), _renews_cell(row),
            Text(str(row["rotations"])), Text(ago(last, now) if last else "-"),
        )
    return table


def identity_detail(body: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: dt.datetime,
                    limit: int = 20) -> RenderableType:
    """`status NAME`: the identity's fields, its conditions, and its most recent Events (oldest first)."""
    row = identity_row(body, now)
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column()
    not_after, renewal = parse_time(row["notAfter"]), parse_time(row["renewalTime"])
    for label, value in (
        ("Name", f"{row['namespace']}/{row['name']}"),
        ("SPIFFE ID", row["spiffeID"] or "-"),
        ("Trust domain", row["trustDomain"] or "-"),
        ("Secret", row["secretName"]),
        ("Data plane", row["dataPlane"] or "- (no sidecar routes)"),
        ("Ready", ready_cell(row)),
        ("Serial", row["serial"] or "-"),
        ("Not before", row["notBefore"] or "-"),
        ("Not after", f"{row['notAfter']} ({ago(not_after, now)})" if not_after else "-"),
        ("Renews", f"{row['renewalTime']} ({ago(renewal, now)})" if renewal else "-"),
        ("Rotations", str(row["rotations"])),
        ("Last rotation", row["lastRotationTime"] or "-"),
        ("Last renew request", row["lastRenewRequest"] or "-"),
    ):
        fields.add_row(Text(label), value if isinstance(value, Text) else Text(str(value)))
    conditions = new_table(("TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION"))
    for c in (body.get("status") or {}).get("conditions") or []:
        style = "green" if c.get("status") == "True" else ("red" if c.get("type") == "Ready" else "")
        conditions.add_row(Text(str(c.get("type", ""))), Text(str(c.get("status", "")), style=style),
                           Text(str(c.get("reason", ""))), Text(str(c.get("message", ""))),
                           Text(ago(parse_time(c.get("lastTransitionTime")), now)))
    rows = sorted_events(events)[-limit:] if limit > 0 else []
    parts: list[RenderableType] = [fields, Text(""), Text("Conditions:", style="bold"), conditions, Text("")]
    parts.append(Text(f"Events (last {len(rows)}):" if rows else "Events: none", style="bold"))
    if rows:
        parts.append(events_table([event_row(e) for e in rows], now))
    return Group(*parts)


def identity_detail_data(body: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: dt.datetime,
                         limit: int = 20) -> dict[str, Any]:
    return {"identity": identity_row(body, now),
            "conditions": list((body.get("status") or {}).get("conditions") or []),
            "events": [event_row(e) for e in sorted_events(events)[-limit:]] if limit > 0 else []}
