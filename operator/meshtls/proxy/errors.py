"""How a failed handshake or TLS error is told apart (the `reason` of a rejection metric and log line), and how
values are written into a log line."""

from __future__ import annotations

import ssl
from typing import Any

HANDSHAKE_TIMEOUT = 10.0  # seconds; enforced by splice, defined here because its expiry is a rejection reason

# OpenSSL X509_V_ERR_* codes a sidecar operator will want told apart.
_VERIFY_REASONS = {
    23: "revoked",
    10: "expired",
    9: "not_yet_valid",
    3: "crl_unavailable",
    11: "crl_unavailable",
    12: "crl_expired",
    8: "crl_unavailable",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


class NoIdentity(Exception):
    """No certificate has loaded yet: connections are refused before any handshake."""


def classify_tls_error(exc: BaseException) -> tuple[str, str]:
    """(metric reason, human detail) for a failed handshake or TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, "untrusted"), f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "handshake_timeout", f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", "the peer sent no client certificate"
        if reason in _NOT_TLS:
            return "not_tls", f"not a TLS client ({reason.lower()})"
        if "ALERT" in reason:
            return "peer_refused", f"the peer refused the handshake ({reason.lower()})"
        if reason == "UNSUPPORTED_PROTOCOL":
            return "tls_version", "the peer offers only TLS < 1.2"
        return "handshake_failed", reason.lower() or str(exc)
    if isinstance(exc, ConnectionError | EOFError):
        return "peer_closed", "the peer closed the connection during the handshake"
    return "handshake_failed", str(exc) or type(exc).__name__


def log_value(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (not text or " " in text or '"' in text or "=" in text) else text


def error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def peer_address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = peername[0]
        return f"[{host}]:{peername[1]}" if ":" in str(host) else f"{host}:{peername[1]}"
    return "-"
