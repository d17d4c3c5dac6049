"""Shared fixtures for the fast tests: no cluster, a fixed clock.

`ca` and `other_ca` are born at the fixed clock (NOW), for everything that takes `now` as an argument. A module whose
certificates OpenSSL or a running sidecar judges against the real time (handshakes, `openssl verify`) sets
`WALL_CLOCK = True` and gets CAs born now: a CA of a fixed date would expire under those tests a year after NOW.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from testsupport.clock import NOW
from testsupport.proxymesh import Mesh, build_mesh
from testsupport.tools import require_openssl

from meshtls.pki import CertificateAuthority, generate_ca


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    return NOW


def _birth(request: pytest.FixtureRequest) -> dt.datetime:
    return dt.datetime.now(dt.UTC) if getattr(request.module, "WALL_CLOCK", False) else NOW


@pytest.fixture(scope="module")
def ca(request: pytest.FixtureRequest) -> CertificateAuthority:
    return generate_ca("example.org", _birth(request))


@pytest.fixture(scope="module")
def other_ca(request: pytest.FixtureRequest) -> CertificateAuthority:
    return generate_ca("example.org", _birth(request))


@pytest.fixture
def mesh(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Mesh]:
    """A client and a server sidecar in-process, with an app behind the server (see testsupport.proxymesh)."""
    with build_mesh(tmp_path, ca) as m:
        yield m


@pytest.fixture(scope="session")
def openssl() -> str:
    return require_openssl()
