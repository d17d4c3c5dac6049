"""`meshtls inspect`: a report (from `cli.inspection`) drawn as a header and the chain table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from meshtls.cli.output import new_table
from meshtls.cli.views.check import MARKS


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
