"""TLS serving certificates for meshtls's own endpoints (the admission webhook), not workload identities."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtls.pki.ca import CertificateAuthority, random_serial
from meshtls.pki.issue import IssuedCertificate
from meshtls.pki.keys import KeyAlgorithm, generate_private_key, private_key_pem
from meshtls.pki.pem import certificate_pem


def issue_serving_certificate(
    ca: CertificateAuthority, dns_names: list[str], ip_addresses: list[str], now: dt.datetime, ttl: dt.timedelta
) -> IssuedCertificate:
    """A server certificate for hostnames and IPs (the API server checks the webhook's name, not a SPIFFE ID)."""
    key = generate_private_key(KeyAlgorithm.ECDSA_P256)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = (dns_names or ip_addresses or ["meshtls"])[0][:64]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + ttl, ca.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
        .sign(ca.key, ca.hash_algorithm())
    )
    return IssuedCertificate(cert, private_key_pem(key), certificate_pem(cert) + ca.chain_pem, ca.roots_pem)
