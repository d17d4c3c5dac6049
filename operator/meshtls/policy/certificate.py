"""What meshtls reads back from a Secret: the certificate in it, parsed once, and whether it still fits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshtls.pki import PKIError, load_certificates, load_private_key_pem, svid_spiffe_id
from meshtls.pki.issue import format_serial
from meshtls.pki.keys import KeyAlgorithm, public_keys_match


@dataclass(frozen=True)
class SecretCertificate:
    """The parsed content of a kubernetes.io/tls Secret; `problem` says why it is unusable, if it is."""

    certificate: x509.Certificate | None
    key_algorithm: KeyAlgorithm | None
    problem: str | None

    @property
    def serial(self) -> str | None:
        return format_serial(self.certificate.serial_number) if self.certificate else None


def key_algorithm_of(key: object) -> KeyAlgorithm | None:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return KeyAlgorithm.ECDSA_P384 if key.curve.key_size == 384 else KeyAlgorithm.ECDSA_P256
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return KeyAlgorithm.ED25519
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return KeyAlgorithm(f"rsa-{key.key_size}") if key.key_size in (2048, 3072, 4096) else None
    return None


def read_secret_certificate(data: Mapping[str, bytes]) -> SecretCertificate:
    """Parse tls.crt/tls.key; any missing or inconsistent part is a `problem` (the Secret was tampered with)."""
    missing = [k for k in ("tls.crt", "tls.key", "ca.crt") if not data.get(k)]
    if missing:
        return SecretCertificate(None, None, f"missing {', '.join(missing)}")
    try:
        cert = load_certificates(data["tls.crt"], "tls.crt")[0]
        key = load_private_key_pem(data["tls.key"], "tls.key")
        svid_spiffe_id(cert)
    except PKIError as exc:
        return SecretCertificate(None, None, str(exc))
    if not public_keys_match(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        return SecretCertificate(cert, None, "tls.key does not match tls.crt")
    return SecretCertificate(cert, key_algorithm_of(key), None)


def dns_names_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None
