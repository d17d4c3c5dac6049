"""Golden files: a rendered text against the one kept under tests/golden, shown as a readable diff when they differ.

`MESHTLS_UPDATE_GOLDEN=1` rewrites the golden files instead of comparing (review the diff in git before committing).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

UPDATE = os.environ.get("MESHTLS_UPDATE_GOLDEN") == "1"


def assert_golden(out: Path, text: str) -> None:
    """Fail with a unified diff unless `text` equals the golden file `out` (or rewrite it under UPDATE)."""
    if UPDATE:
        out.write_text(text)
        return
    expected = out.read_text() if out.exists() else ""
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"{out.name} (golden)", f"{out.name} (now)"))
        pytest.fail(f"{out.name} differs (MESHTLS_UPDATE_GOLDEN=1 to accept):\n{diff}")
