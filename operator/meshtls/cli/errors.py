"""How the CLI fails: one line naming what was wrong, exit status 2 for bad input, 1 for a failed check."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


class CommandFailed(Exception):
    """The command ran but what it checked or asked for failed (unreachable cluster, unknown name): exit 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line rather than the usage text and a traceback-like dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)
