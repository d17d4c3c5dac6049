"""What the cluster commands print: rows from resource bodies, rich tables, JSON and YAML. No API calls here.

Every function takes plain dicts (the API's camelCase JSON) and a `now`, so tests render sample bodies with a fixed
clock. Tables go through `Output`, which draws them with rich on a terminal and as plain aligned columns (no colour,
no box, no trailing blanks) when stdout is a pipe or NO_COLOR is set; `-o json|yaml` prints the same rows as data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import yaml
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

IDENTITY_COLUMNS = ("NAMESPACE", "NAME", "SPIFFE ID", "READY", "SERIAL", "EXPIRES IN", "RENEWS IN", "ROTATIONS",
                    "LAST ROTATION")
MARKS = {"ok": ("✓", "green"), "fail": ("✗", "bold red"), "skip": ("○", "yellow")}


# --- time ----------------------------------------------------------------------------------------------------------


def parse_time(value: Any) -> dt.datetime | None:
    """An API timestamp (RFC 3339, 'Z' or offset, with or without fractions) as an aware UTC datetime."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not value or not isinstance(value, str):
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def human_duration(delta: dt.timedelta) -> str:
    """Two units at most, kubectl style: 45s, 3m20s, 1h5m, 2d4h, 364d."""
    total = int(abs(delta.total_seconds()))
    sign = "-" if delta.total_seconds() < 0 and total else ""
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days >= 10:
        text = f"{days}d"
    elif days:
        text = f"{days}d{hours}h" if hours else f"{days}d"
    elif hours:
        text = f"{hours}h{minutes}m" if minutes else f"{hours}h"
    elif minutes:
        text = f"{minutes}m{seconds}s" if seconds and minutes < 10 else f"{minutes}m"
    else:
        text = f"{seconds}s"
    return sign + text


def ago(t: dt.datetime | None, now: dt.datetime) -> str:
    if t is None:
        return "-"
    return f"{human_duration(now - t)} ago" if t <= now else f"in {human_duration(t - now)}"


def seconds_until(t: dt.datetime | None, now: dt.datetime) -> float | None:
    return round((t - now).total_seconds(), 3) if t else None


# --- WorkloadIdentities --------------------------------------------------------------------------------------------


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
        "secretName": status.get("secretName") or (body.get("spec") or {}).get("secretName")
        or f"{meta.get('name')}-mtls",
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


def _ready_cell(row: Mapping[str, Any]) -> Text:
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
            _ready_cell(row), Text(row.get("serial") or "-"), _expires_cell(row), _renews_cell(row),
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
        ("Ready", _ready_cell(row)),
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


# --- Events --------------------------------------------------------------------------------------------------------


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
    return {"Issued": "green", "Rotated": "cyan", "Revoked": "magenta", "Repaired": "yellow"}.get(
        str(row.get("reason")), "")


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


# --- check ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    title: str  # what was checked, e.g. "CRDs", "TrustDomain example.org", "WorkloadIdentity shop/web"
    status: str  # "ok" | "fail" | "skip"
    message: str
    reason: str = ""  # a machine-readable cause for callers that act on it (not printed)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.title, "status": self.status, "message": self.message}


def check_line(result: CheckResult) -> Text:
    mark, style = MARKS[result.status]
    text = Text()
    text.append(mark, style=style)
    text.append(" ")
    text.append(result.title, style="bold")
    text.append(": ")
    text.append(result.message, style="red" if result.failed else "")
    return text


def check_summary(results: Sequence[CheckResult]) -> Text:
    failed = sum(r.failed for r in results)
    skipped = sum(r.status == "skip" for r in results)
    passed = len(results) - failed - skipped
    text = f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
    return Text(text, style="bold red" if failed else "bold green")


# --- inspect -------------------------------------------------------------------------------------------------------


def inspect_renderable(report: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row(Text("Source"), Text(str(report.get("source"))))
    head.add_row(Text("SPIFFE ID"), Text(str(report.get("spiffeID") or "-")))
    validity = report.get("validity") or {}
    style = "red" if validity.get("state") != "valid" else "green"
    head.add_row(Text("Validity"), Text(str(validity.get("text", "-")), style=style))
    if report.get("keyMatches") is not None:
        head.add_row(Text("Key"), Text("tls.key matches tls.crt", style="green") if report["keyMatches"]
                     else Text(report.get("keyProblem") or "tls.key does NOT match tls.crt", style="bold red"))
    for check in report.get("checks") or []:
        mark, mstyle = MARKS[check["status"]]
        line = Text()
        line.append(mark, style=mstyle)
        line.append(f" {check['message']}")
        head.add_row(Text(check["title"]), line)
    parts.append(head)
    parts.append(Text(""))
    chain = new_table(("#", "ROLE", "SUBJECT", "ISSUER", "SERIAL", "NOT BEFORE", "NOT AFTER", "SHA-256"))
    for i, cert in enumerate(report.get("chain") or []):
        chain.add_row(Text(str(i)), Text(cert["role"]), Text(cert["subject"]), Text(cert["issuer"]),
                      Text(cert["serial"]), Text(cert["notBefore"]), Text(cert["notAfter"]),
                      Text(cert["sha256"][:16] + "…"))
    parts.append(Text("Chain:", style="bold"))
    parts.append(chain)
    return Group(*parts)


# --- output --------------------------------------------------------------------------------------------------------


FOLDABLE = frozenset({"SPIFFE ID", "MESSAGE", "SUBJECT", "ISSUER"})  # may wrap on a narrow terminal; others never


def new_table(columns: Iterable[str]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold", expand=False,
                  padding=(0, 1, 0, 0))  # with the box's blank divider: two blanks between columns
    for name in columns:
        if name in FOLDABLE:
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, no_wrap=True)
    return table


def to_data_text(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2, default=str)
    return str(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False, allow_unicode=True))


class Output:
    """Where a command prints: rich on a terminal; plain columns on a pipe or with NO_COLOR; data with -o."""

    def __init__(self, fmt: str = "table", file: IO[str] | None = None, force_terminal: bool | None = None) -> None:
        self.format = fmt
        self.file = file or sys.stdout
        self.console = Console(file=self.file, highlight=False, force_terminal=force_terminal, emoji=False)
        self.plain = not self.console.is_terminal or bool(os.environ.get("NO_COLOR"))
        if self.plain:
            self.console = Console(file=self.file, highlight=False, no_color=True, color_system=None,
                                   width=100_000, emoji=False, force_terminal=False)

    @property
    def data(self) -> bool:
        return self.format in ("json", "yaml")

    def show(self, renderable: RenderableType) -> None:
        if not self.plain:
            self.console.print(renderable)
        else:
            _strip_boxes(renderable)
            with self.console.capture() as captured:
                self.console.print(renderable)
            self.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        self.file.flush()

    def dump(self, data: Any) -> None:
        self.file.write(to_data_text(data, self.format).rstrip("\n") + "\n")
        self.file.flush()

    def line(self, data: Any, text: Text) -> None:
        """One record of a stream: a JSON line with -o json, a YAML document with -o yaml, else the text."""
        if self.format == "json":
            self.file.write(json.dumps(data, default=str) + "\n")
            self.file.flush()
        elif self.format == "yaml":
            self.file.write("---\n" + to_data_text(data, "yaml"))
            self.file.flush()
        else:
            self.show(text)


def _strip_boxes(renderable: RenderableType) -> None:
    """Plain output: no box lines (kubectl-like columns separated by blanks)."""
    if isinstance(renderable, Table) and renderable.box is not None:
        renderable.box = None
        renderable.show_edge = False
        renderable.padding = (0, 1)  # no divider: one blank each side, none at the edges (pad_edge=False)
    elif isinstance(renderable, Group):
        for child in renderable.renderables:
            _strip_boxes(child)
