"""Verify a workload certificate against a trust bundle (several roots) and CRLs, as a sidecar would."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshtls.pki.ca import signed_by
from meshtls.pki.errors import PKIError
from meshtls.pki.spiffe import SpiffeId, parse_spiffe_id

MAX_CHAIN_DEPTH = 6


@dataclass(frozen=True)
class Verification:
    spiffe_id: SpiffeId | None
    reason: str | None  # None when the certificate is accepted
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None


def svid_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID: its one and only URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate", "has no SubjectAlternativeName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PKIError("certificate", f"an X509-SVID has exactly one URI SAN, this one has {len(uris)}")
    return parse_spiffe_id(uris[0], "certificate URI SAN")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_svid(
    chain: list[x509.Certificate],
    roots: list[x509.Certificate],
    now: dt.datetime,
    crls: list[x509.CertificateRevocationList] | None = None,
) -> Verification:
    """Build a path from the leaf (chain[0]) to one of the roots and check it; check the leaf against the CRLs."""
    if not chain:
        return Verification(None, "no certificate")
    leaf, extra = chain[0], list(chain[1:])
    try:
        spiffe_id = svid_spiffe_id(leaf)
    except PKIError as exc:
        return Verification(None, exc.message)
    if _is_ca(leaf):
        return Verification(spiffe_id, "leaf is a CA certificate")
    path = [leaf]
    current = leaf
    root_fps = {r.fingerprint(hashes.SHA256()) for r in roots}
    while True:
        for cert in path:
            if cert.not_valid_after_utc <= now:
                return Verification(spiffe_id, f"certificate {_serial(cert)} expired at {cert.not_valid_after_utc}")
            if cert.not_valid_before_utc > now:
                return Verification(spiffe_id, f"certificate {_serial(cert)} is not valid yet")
        anchor = next((r for r in roots if signed_by(current, r)), None)
        if anchor is not None:
            if anchor.not_valid_after_utc <= now:
                return Verification(spiffe_id, "trust anchor expired")
            path.append(anchor)
            break
        if len(path) >= MAX_CHAIN_DEPTH:
            return Verification(spiffe_id, "chain too long")
        parent = next((c for c in extra if signed_by(current, c) and _is_ca(c)), None)
        if parent is None:
            return Verification(spiffe_id, "no path to a trusted root (unknown CA)")
        if parent.fingerprint(hashes.SHA256()) in root_fps:
            break
        path.append(parent)
        current = parent
    issuer = path[1]
    for crl in crls or ():
        if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            continue
        if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            return Verification(spiffe_id, f"certificate {_serial(leaf)} is revoked")
    return Verification(spiffe_id, None, tuple(path))


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")
