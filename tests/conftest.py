"""Shared fixtures for the fast tests: no cluster, a fixed clock."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from meshtls.pki import CertificateAuthority, generate_ca

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    return NOW


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return generate_ca("example.org", dt.datetime.now(dt.UTC))


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    return generate_ca("example.org", dt.datetime.now(dt.UTC))


@pytest.fixture(scope="session")
def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl command line is needed for the interop tests: apt-get install openssl")
    return path
