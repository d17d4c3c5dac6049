"""`meshtls check` lines: one verdict per line with its mark, and the summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text

MARKS = {"ok": ("✓", "green"), "fail": ("✗", "bold red"), "skip": ("○", "yellow")}



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
