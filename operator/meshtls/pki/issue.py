"""Leaf issuance: X509-SVIDs for workloads."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from meshtls.pki.ca import CertificateAuthority, random_serial
from meshtls.pki.errors import PKIError
from meshtls.pki.keys import DEFAULT_KEY_ALGORITHM, KeyAlgorithm, generate_private_key, private_key_pem
from meshtls.pki.pem import certificate_pem
from meshtls.pki.spiffe import SpiffeId

# Backdating notBefore keeps a fresh certificate valid on a peer whose clock runs behind (Istio learned this).
DEFAULT_BACKDATE = dt.timedelta(seconds=60)
MAX_DNS_NAME_LENGTH = 253

_ORG = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshtls")


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf and its key, ready for a kubernetes.io/tls Secret."""

    certificate: x509.Certificate
    key_pem: bytes
    cert_chain_pem: bytes  # the leaf followed by the CA chain (no root)
    ca_pem: bytes  # the trust anchors

    @property
    def serial_number(self) -> int:
        return self.certificate.serial_number

    @property
    def serial_hex(self) -> str:
        return format_serial(self.certificate.serial_number)

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


def format_serial(serial: int) -> str:
    return format(serial, "x")


_DNS_NAME = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


# A numeric last label (decimal, or 0x hex as inet_aton reads it) makes an IP literal, never a host name (no
# top-level domain is numeric): 10.0.0.1, 167772161, 0x7f.1 would be minted as dNSName SANs no client matches.
_IP_LITERAL = re.compile(r"(^|.*\.)([0-9]+|0x[0-9a-f]*)")


def validate_dns_name(name: str, field: str = "dnsNames") -> str:
    """A lowercase RFC 1123 name, optionally with one leading wildcard label; never an IP literal."""
    if not 0 < len(name) <= MAX_DNS_NAME_LENGTH or not _DNS_NAME.fullmatch(name):
        raise PKIError(field, f"{name!r} is not a lowercase RFC 1123 DNS name (max {MAX_DNS_NAME_LENGTH} characters)")
    if _IP_LITERAL.fullmatch(name):
        raise PKIError(field, f"{name!r} is an IP address, not a DNS name (its last label is numeric): meshtls mints "
                              "DNS names only")
    return name


def issue_svid(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    now: dt.datetime,
    ttl: dt.timedelta,
    dns_names: tuple[str, ...] | list[str] = (),
    key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
    backdate: dt.timedelta = DEFAULT_BACKDATE,
) -> IssuedCertificate:
    """Mint a key and an X509-SVID: one URI SAN, CA=false, digitalSignature, server+client auth.

    notAfter never passes the CA's own expiry: a leaf outliving its issuer would fail verification anyway.
    """
    if ttl <= dt.timedelta(0):
        raise PKIError("ttl", "must be positive")
    for name in dns_names:
        validate_dns_name(name)
    key = generate_private_key(key_algorithm)
    public = key.public_key()
    not_before = max(now - backdate, ca.not_before)
    not_after = min(now + ttl, ca.not_after)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(n) for n in dns_names]
    builder = (
        ca.leaf_template(rsa_key=isinstance(key, rsa.RSAPrivateKey))
        .subject_name(x509.Name([_ORG, x509.NameAttribute(NameOID.COMMON_NAME, _common_name(spiffe_id, dns_names))]))
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # The SAN is critical only when the subject is empty; ours has a CN, so not.
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    cert = builder.sign(ca.key, ca.hash_algorithm())
    return IssuedCertificate(
        certificate=cert,
        key_pem=private_key_pem(key),
        cert_chain_pem=certificate_pem(cert) + ca.chain_pem,
        ca_pem=ca.roots_pem,
    )


def _common_name(spiffe_id: SpiffeId, dns_names: tuple[str, ...] | list[str]) -> str:
    # CN is capped at 64 characters by X.520; the SAN carries the real identity.
    text = dns_names[0] if dns_names else (spiffe_id.segments[-1] if spiffe_id.segments else spiffe_id.trust_domain)
    return text[:64]
