"""Where the CLI's output goes: rich tables on a terminal; plain aligned columns (no colour, no box, no trailing
blanks) when stdout is a pipe or NO_COLOR is set; `-o json|yaml` prints the same rows as data."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

import yaml
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

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
