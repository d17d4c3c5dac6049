"""Key algorithms for workload and CA keys."""

from __future__ import annotations

from enum import StrEnum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from meshtls.pki.errors import PKIError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class KeyAlgorithm(StrEnum):
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    ED25519 = "ed25519"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, value: str, field: str = "keyAlgorithm") -> KeyAlgorithm:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(a.value for a in cls)
            raise PKIError(field, f"{value!r} is not supported; allowed: {allowed}") from None

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")


DEFAULT_KEY_ALGORITHM = KeyAlgorithm.ECDSA_P256
_CURVES = {KeyAlgorithm.ECDSA_P256: ec.SECP256R1(), KeyAlgorithm.ECDSA_P384: ec.SECP384R1()}
# Anything weaker than these is refused when a user brings a CA.
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256


def generate_private_key(algorithm: KeyAlgorithm) -> PrivateKey:
    if algorithm in _CURVES:
        return ec.generate_private_key(_CURVES[algorithm])
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm.value.split("-")[1]))


SignatureHash = hashes.SHA256 | hashes.SHA384


def signature_hash(key: PrivateKey) -> SignatureHash | None:
    """The digest a CA key signs with; Ed25519 takes none."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_pem(data: bytes, field: str = "tls.key") -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(field, f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise PKIError(field, f"key type {type(key).__name__} is not supported (ECDSA, Ed25519 or RSA)")
    return key


def key_strength_problem(key: PublicKey) -> str | None:
    """Why a key is too weak to sign with, or None."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS})"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < MIN_EC_BITS:
        return f"EC key on {key.curve.name} is too weak (at least P-256)"
    return None


def public_keys_match(a: PublicKey, b: PublicKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)
