"""PEM bundles: several certificates in one file."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtls.pki.errors import PKIError


def load_certificates(data: bytes, field: str = "certificate") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise PKIError(field, "contains no PEM certificate")
    return certs


def certificates_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()
