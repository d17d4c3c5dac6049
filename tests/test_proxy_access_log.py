"""The access log's sampling: the first connection of each peer certificate in each direction at INFO, the others
at DEBUG, with a bounded memory of what was logged."""

from __future__ import annotations

import logging

import pytest

from meshtls.dataplane.config import SidecarConfig
from meshtls.proxy import server
from meshtls.proxy.server import Proxy


def _proxy() -> Proxy:
    return Proxy(SidecarConfig(spiffe_id="spiffe://log.test/ns/a/sa/b"))


def test_first_connection_of_a_certificate_per_direction_at_info_the_rest_at_debug() -> None:
    proxy = _proxy()
    assert proxy.access_log_level("inbound", "0a") == logging.INFO
    assert proxy.access_log_level("inbound", "0a") == logging.DEBUG
    assert proxy.access_log_level("inbound", "0a") == logging.DEBUG
    assert proxy.access_log_level("inbound", "0b") == logging.INFO  # a rotated (or another) certificate
    assert proxy.access_log_level("outbound", "0a") == logging.INFO  # the other direction is its own
    assert proxy.access_log_level("outbound", "0a") == logging.DEBUG


def test_the_memory_of_logged_certificates_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "ACCESS_LOG_MEMORY", 3)
    proxy = _proxy()
    levels = [proxy.access_log_level("inbound", serial) for serial in ("1", "2", "3", "1", "4", "1")]
    # "4" finds the memory full: it starts over, so "1" is logged at INFO once more
    assert levels == [logging.INFO, logging.INFO, logging.INFO, logging.DEBUG, logging.INFO, logging.INFO]
    assert len(proxy._access_logged) <= 3
