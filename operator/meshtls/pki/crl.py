"""Certificate revocation lists that stay small: an entry leaves once its certificate has expired anyway."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtls.pki.ca import CertificateAuthority
from meshtls.pki.errors import PKIError

DEFAULT_CRL_VALIDITY = dt.timedelta(hours=24)


class RevocationReason(StrEnum):
    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"

    @classmethod
    def parse(cls, value: str, field: str = "reason") -> RevocationReason:
        for reason in cls:
            if reason.value.lower() == value.lower():
                return reason
        allowed = ", ".join(r.value for r in cls)
        raise PKIError(field, f"{value!r} is not a revocation reason; allowed: {allowed}")

    @property
    def x509_flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags(self.value)


@dataclass(frozen=True, order=True)
class RevokedCertificate:
    """One CRL entry. `not_after` is the certificate's own expiry: past it, the entry can be dropped."""

    serial_number: int
    revoked_at: dt.datetime
    not_after: dt.datetime
    reason: RevocationReason = RevocationReason.UNSPECIFIED


def drop_expired(entries: list[RevokedCertificate], now: dt.datetime) -> list[RevokedCertificate]:
    """Entries whose certificate is still valid; an expired certificate fails verification on its own."""
    return [e for e in entries if e.not_after > now]


def build_crl(
    ca: CertificateAuthority,
    entries: list[RevokedCertificate],
    crl_number: int,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """Sign a CRL holding the still-relevant entries, numbered so consumers can tell newer from older."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - dt.timedelta(seconds=60))
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
    )
    seen: set[int] = set()
    for entry in sorted(drop_expired(entries, now)):
        if entry.serial_number in seen:
            continue
        seen.add(entry.serial_number)
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial_number)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not RevocationReason.UNSPECIFIED:
            revoked = revoked.add_extension(x509.CRLReason(entry.reason.x509_flag), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(ca.key, ca.hash_algorithm())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_crls(data: bytes, field: str = "crl.pem") -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (a bundle may carry one per CA during a CA rotation)."""
    crls = []
    marker = b"-----BEGIN X509 CRL-----"
    for chunk in data.split(marker)[1:]:
        try:
            crls.append(x509.load_pem_x509_crl(marker + chunk))
        except ValueError as exc:
            raise PKIError(field, f"holds a CRL that cannot be parsed ({exc})") from None
    return crls


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def entries_from_crl(
    crl: x509.CertificateRevocationList, default_not_after: dt.datetime
) -> list[RevokedCertificate]:
    """Read entries back from a CRL (the offline CLI keeps no other state); expiry is unknown there."""
    out = []
    for rc in crl:
        try:
            flag = rc.extensions.get_extension_for_class(x509.CRLReason).value.reason
            reason = RevocationReason(flag.value)
        except (x509.ExtensionNotFound, ValueError):
            reason = RevocationReason.UNSPECIFIED
        out.append(RevokedCertificate(rc.serial_number, rc.revocation_date_utc, default_not_after, reason))
    return out
