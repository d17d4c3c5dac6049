"""The PKI core: CAs, X509-SVID issuance, CRLs, SPIFFE IDs and verification. Pure: cryptography only."""

from meshtls.pki.ca import CertificateAuthority, check_ca_can_sign_svids, generate_ca, load_ca, random_serial
from meshtls.pki.crl import (
    RevocationReason,
    RevokedCertificate,
    build_crl,
    crl_number,
    crl_pem,
    drop_expired,
    load_crls,
)
from meshtls.pki.errors import PKIError
from meshtls.pki.issue import IssuedCertificate, format_serial, issue_svid, validate_dns_name
from meshtls.pki.keys import DEFAULT_KEY_ALGORITHM, KeyAlgorithm, load_private_key_pem
from meshtls.pki.pem import certificate_pem, certificates_pem, fingerprint_sha256, load_certificates
from meshtls.pki.spiffe import SpiffeId, matches_pattern, parse_spiffe_id, workload_spiffe_id
from meshtls.pki.verify import Verification, svid_spiffe_id, verify_svid

__all__ = [
    "DEFAULT_KEY_ALGORITHM",
    "CertificateAuthority",
    "IssuedCertificate",
    "KeyAlgorithm",
    "PKIError",
    "RevocationReason",
    "RevokedCertificate",
    "SpiffeId",
    "Verification",
    "build_crl",
    "certificate_pem",
    "certificates_pem",
    "check_ca_can_sign_svids",
    "crl_number",
    "crl_pem",
    "drop_expired",
    "fingerprint_sha256",
    "format_serial",
    "generate_ca",
    "issue_svid",
    "load_ca",
    "load_certificates",
    "load_crls",
    "load_private_key_pem",
    "matches_pattern",
    "parse_spiffe_id",
    "random_serial",
    "svid_spiffe_id",
    "validate_dns_name",
    "verify_svid",
    "workload_spiffe_id",
]
