"""Who the peer is (from its certificate, cached per DER) and whether a route lets it through."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from meshtls.pki.errors import PKIError
from meshtls.pki.issue import format_serial
from meshtls.pki.spiffe import matches_pattern
from meshtls.pki.verify import svid_spiffe_id

PEER_CACHE_SIZE = 1024


@dataclass(frozen=True)
class PeerInfo:
    spiffe_id: str | None
    error: str | None
    not_after: float
    serial: str
    serial_number: int
    issuer: x509.Name


class PeerCache:
    """PeerInfo by certificate DER: a busy peer's certificate is parsed once, not per connection."""

    def __init__(self, size: int = PEER_CACHE_SIZE) -> None:
        self._size = size
        self._infos: dict[bytes, PeerInfo] = {}

    def get(self, der: bytes) -> PeerInfo:
        info = self._infos.get(der)
        if info is None:
            cert = x509.load_der_x509_certificate(der)
            try:
                spiffe_id: str | None = str(svid_spiffe_id(cert))
                error = None
            except PKIError as exc:
                spiffe_id, error = None, exc.message
            info = PeerInfo(spiffe_id, error, cert.not_valid_after_utc.timestamp(), format_serial(cert.serial_number),
                            cert.serial_number, cert.issuer)
            if len(self._infos) >= self._size:
                self._infos.clear()
            self._infos[der] = info
        return info


def authorize(info: PeerInfo | None, allowed: tuple[str, ...], now: float) -> tuple[str, str] | None:
    """None when the peer may pass, else (reason, detail). `now` is a POSIX timestamp."""
    if info is None:
        return "no_certificate", "the peer presented no certificate"
    if info.spiffe_id is None:
        return "bad_svid", f"not an X509-SVID: {info.error}"
    if info.not_after <= now:
        # A resumed session skips verification: its certificate may have expired since.
        return "expired", f"certificate {info.serial} expired"
    if not any(matches_pattern(info.spiffe_id, p) for p in allowed):
        return "not_allowed", "not in the allow-list" if allowed else "the allow-list is empty"
    return None
