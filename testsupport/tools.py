"""Command-line tools some tests need from the machine, found once with one message when missing."""

from __future__ import annotations

import shutil

import pytest


def require_openssl() -> str:
    """The openssl command line (interop tests talk to it), or the test fails saying how to install it."""
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl command line is needed for the interop tests: apt-get install openssl")
    return path
