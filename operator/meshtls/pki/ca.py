"""Certificate authorities: one meshtls generates, or one a user brings (a root or an intermediate)."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtls.pki.errors import PKIError
from meshtls.pki.keys import (
    DEFAULT_KEY_ALGORITHM,
    KeyAlgorithm,
    PrivateKey,
    SignatureHash,
    generate_private_key,
    key_strength_problem,
    load_private_key_pem,
    private_key_pem,
    public_keys_match,
    signature_hash,
)
from meshtls.pki.pem import certificate_pem, certificates_pem, fingerprint_sha256, load_certificates
from meshtls.pki.spiffe import SCHEME, validate_trust_domain

DEFAULT_CA_VALIDITY = dt.timedelta(days=365)


def random_serial() -> int:
    # 127 random bits, top bit clear: positive, >= 64 bits of entropy as the CA/B baseline asks.
    return secrets.randbits(127) | 1 << 64


@dataclass(frozen=True)
class CertificateAuthority:
    """A signing CA: its certificate, key, and the chain above it up to (and including) a root, if any."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    # Derived once: every leaf carries the same issuer name and AKI, so issuance never recomputes them.
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False, compare=False)
    _chain_pem: bytes = field(init=False, repr=False, compare=False)
    _roots: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False)
    _roots_pem: bytes = field(init=False, repr=False, compare=False)
    _leaf_templates: dict[bool, x509.CertificateBuilder] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        object.__setattr__(self, "_aki", aki)
        certs = [self.certificate, *self.chain]
        top = certs[-1]
        object.__setattr__(self, "_roots", (top,))
        object.__setattr__(self, "_roots_pem", certificate_pem(top))
        object.__setattr__(self, "_leaf_templates", {})
        # tls.crt carries the leaf, this CA and any intermediates, but not the root: peers have that.
        object.__setattr__(self, "_chain_pem", certificates_pem(certs[:-1] if is_self_signed(top) else certs))

    def leaf_template(self, rsa_key: bool) -> x509.CertificateBuilder:
        """The parts every leaf of this CA shares, built once: issuance is a hot path."""
        template = self._leaf_templates.get(rsa_key)
        if template is None:
            constant: list[tuple[x509.ExtensionType, bool]] = [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_leaf_key_usage(key_encipherment=rsa_key), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                (self._aki, False),
            ]
            template = x509.CertificateBuilder().issuer_name(self.certificate.subject)
            for ext, critical in constant:
                # Pre-encoded DER: the same bytes as the typed extension, without re-encoding it per leaf.
                template = template.add_extension(x509.UnrecognizedExtension(ext.oid, ext.public_bytes()), critical)
            self._leaf_templates[rsa_key] = template
        return template

    @property
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        return self._aki

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def fingerprint(self) -> str:
        return fingerprint_sha256(self.certificate)

    @property
    def roots(self) -> list[x509.Certificate]:
        """The trust anchors workloads need: the certificate at the top of the chain."""
        return list(self._roots)

    @property
    def roots_pem(self) -> bytes:
        return self._roots_pem

    @property
    def chain_pem(self) -> bytes:
        """What goes after a leaf in tls.crt: this CA and any intermediates, without the root."""
        return self._chain_pem

    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def hash_algorithm(self) -> SignatureHash | None:
        return signature_hash(self.key)


def _leaf_key_usage(key_encipherment: bool) -> x509.KeyUsage:
    # X509-SVID: digitalSignature, never keyCertSign/cRLSign; RSA key exchange also needs keyEncipherment.
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether `parent` issued `child`: names chain and the signature verifies."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except Exception:
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return signed_by(cert, cert)


def generate_ca(
    trust_domain: str,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_CA_VALIDITY,
    algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
    common_name: str | None = None,
) -> CertificateAuthority:
    """A self-signed root for a trust domain, with the trust domain's SPIFFE ID as its URI SAN."""
    validate_trust_domain(trust_domain)
    key = generate_private_key(algorithm)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshtls"),
            x509.NameAttribute(NameOID.COMMON_NAME, (common_name or f"meshtls CA {trust_domain}")[:64]),  # X.520 ub
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{secrets.randbits(32):08x}"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]),
            critical=False,
        )
        .sign(key, signature_hash(key))
    )
    return CertificateAuthority(cert, key)


def load_ca(cert_pem: bytes, key_pem: bytes, now: dt.datetime, chain_pem: bytes = b"") -> CertificateAuthority:
    """Load a CA a user brings and say exactly what is wrong when it cannot sign workload certificates.

    cert_pem may hold the CA certificate followed by its chain; chain_pem may add more of the chain.
    """
    certs = load_certificates(cert_pem, "ca.crt")
    if chain_pem.strip():
        certs += load_certificates(chain_pem, "chain")
    ca_cert, chain = certs[0], certs[1:]
    key = load_private_key_pem(key_pem, "ca.key")
    _check_ca_certificate(ca_cert, "ca.crt", now)
    if not public_keys_match(ca_cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise PKIError("ca.key", "does not match the public key of ca.crt")
    weak = key_strength_problem(key.public_key())
    if weak:
        raise PKIError("ca.key", weak)
    child = ca_cert
    for i, parent in enumerate(chain):
        where = f"chain[{i}]"
        _check_ca_certificate(parent, where, now)
        if child.issuer != parent.subject:
            raise PKIError(where, f"does not link: {_cn(child)} is issued by {child.issuer.rfc4514_string()!r}, "
                                  f"not {parent.subject.rfc4514_string()!r}")
        try:
            child.verify_directly_issued_by(parent)
        except Exception:
            raise PKIError(where, f"does not link: its key did not sign {_cn(child)}") from None
        child = parent
    if not chain and not is_self_signed(ca_cert):
        raise PKIError("chain", "an intermediate CA needs its chain up to the root (ca.crt then its issuers)")
    if chain and not is_self_signed(chain[-1]):
        raise PKIError("chain", "must end with a self-signed root")
    return CertificateAuthority(ca_cert, key, tuple(chain))


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return repr(cns[0].value) if cns else repr(cert.subject.rfc4514_string())


def _check_ca_certificate(cert: x509.Certificate, field: str, now: dt.datetime) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PKIError(field, f"{_cn(cert)} is not a CA (no BasicConstraints extension)") from None
    if not bc.ca:
        raise PKIError(field, f"{_cn(cert)} is not a CA (BasicConstraints CA=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise PKIError(field, f"{_cn(cert)} may not sign certificates (KeyUsage lacks keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    if cert.not_valid_after_utc <= now:
        raise PKIError(field, f"{_cn(cert)} expired at {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise PKIError(field, f"{_cn(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}")
    weak = key_strength_problem(cert.public_key())  # type: ignore[arg-type]
    if weak:
        raise PKIError(field, weak)


def _uri_host_matches(host: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10 for URIs: ".example.org" is any host below example.org, "example.org" that host only."""
    host, constraint = host.lower(), constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _uri_constraints(cert: x509.Certificate) -> tuple[list[str] | None, list[str]]:
    """(permitted URI hosts or None when URIs are not restricted, excluded URI hosts)."""
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None, []
    permitted = [str(g.value) for g in nc.permitted_subtrees or () if isinstance(g, x509.UniformResourceIdentifier)]
    excluded = [str(g.value) for g in nc.excluded_subtrees or () if isinstance(g, x509.UniformResourceIdentifier)]
    return (permitted or None), excluded


def check_ca_can_sign_svids(ca: CertificateAuthority, trust_domain: str, max_leaf_ttl: dt.timedelta) -> None:
    """Refuse a CA whose own constraints would make every SVID it signs fail verification at the peer.

    Verifiers check the whole path: a name constraint excluding (or not permitting) the trust domain's URIs, a
    path length an intermediate chain exceeds, or a CA that may not sign CRLs (its CRLs would be refused and
    sidecars fail closed) all break every workload at once; a CA that lives shorter than the longest leaf
    cannot back the leaves the trust domain promises.
    """
    path = [("ca.crt", ca.certificate), *((f"chain[{i}]", c) for i, c in enumerate(ca.chain))]
    for depth, (where, cert) in enumerate(path):
        permitted, excluded = _uri_constraints(cert)
        if any(_uri_host_matches(trust_domain, c) for c in excluded):
            raise PKIError(where, f"{_cn(cert)} has a name constraint excluding URIs of {trust_domain}: "
                                  f"every SVID ({SCHEME}{trust_domain}/...) would be refused")
        if permitted is not None and not any(_uri_host_matches(trust_domain, c) for c in permitted):
            raise PKIError(where, f"{_cn(cert)} permits only URIs of {', '.join(permitted)}: SVIDs of "
                                  f"{trust_domain} would be refused")
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if depth > 0 and bc.path_length is not None and bc.path_length < depth:
            raise PKIError(where, f"{_cn(cert)} has pathLen {bc.path_length}, but {depth} CA(s) below it sign the "
                                  "SVIDs: every chain would be refused")
    try:
        ku = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.crl_sign:
            raise PKIError("ca.crt", f"{_cn(ca.certificate)} may not sign CRLs (KeyUsage lacks cRLSign): sidecars "
                                     "would refuse its CRL and with it every peer")
    except x509.ExtensionNotFound:
        pass
    validity = ca.not_after - ca.not_before
    if validity < max_leaf_ttl:
        raise PKIError("ca.crt", f"{_cn(ca.certificate)} is valid for {validity}, shorter than the trust domain's "
                                 f"maxTTL {max_leaf_ttl}: it cannot back the certificates the trust domain allows")
