"""`meshtls check`: does an identity's bundle verify its chain? (issue 13, item 1). The pure verdict over PEM bytes,
over every combination of what a bundle's ca.crt and crl.pem can hold, judged against a small oracle."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshtls.api.constants import ANNOTATION_OWNER_UID, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.objects import SecretSnapshot
from meshtls.cli import checks
from meshtls.pki import (
    CertificateAuthority,
    IssuedCertificate,
    KeyAlgorithm,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    certificate_pem,
    crl_pem,
    generate_ca,
    issue_svid,
    parse_spiffe_id,
)

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
UID = "0b5c6a5e-1111-2222-3333-444455556666"


def leaf_of(ca: CertificateAuthority, td: str = "a.example", algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
            ) -> IssuedCertificate:
    return issue_svid(ca, parse_spiffe_id(f"spiffe://{td}/ns/m/sa/web"), NOW - dt.timedelta(minutes=5), HOUR,
                      key_algorithm=algorithm)


def crl_of(ca: CertificateAuthority, serials: list[int] = ()) -> str:  # type: ignore[assignment]
    entries = [RevokedCertificate(s, NOW, NOW + HOUR, RevocationReason.KEY_COMPROMISE) for s in serials]
    return crl_pem(build_crl(ca, entries, 2, NOW - dt.timedelta(minutes=1), dt.timedelta(hours=24))).decode()


def expired_copy(ca: CertificateAuthority) -> x509.Certificate:
    """The same root (subject and key) as a stale copy whose validity has ended: it still verifies the leaf."""
    cert = ca.certificate
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.subject)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - dt.timedelta(days=400)).not_valid_after(NOW - dt.timedelta(days=1)))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def a() -> CertificateAuthority:
    return generate_ca("a.example", NOW - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def b() -> CertificateAuthority:
    return generate_ca("b.example", NOW - dt.timedelta(days=1))


@pytest.fixture(scope="module")
def leaf(a: CertificateAuthority) -> IssuedCertificate:
    return leaf_of(a)


# --- every combination of roots and CRLs ------------------------------------------------------------------------------

ROOTS = {  # what ca.crt holds
    "own": ("a",), "other-only": ("b",), "other-then-own": ("b", "a"), "own-then-other": ("a", "b"),
    "expired-own": ("a-expired",), "other-then-expired-own": ("b", "a-expired"), "empty": (), "garbage": None,
}
CRLS = {  # what crl.pem holds
    "none": (), "own-empty": ("a",), "own-revokes-leaf": ("a-revokes",), "other-revokes-leaf": ("b-revokes",),
    "both-empty": ("a", "b"), "own-revokes-and-other": ("b", "a-revokes"), "forged-own": ("a-forged",),
    "garbage": None,
}


def expected(roots: tuple[str, ...] | None, crls: tuple[str, ...] | None) -> str | None:
    """The oracle: what a sidecar would say, in the words bundle_refusal must use (a fragment of them)."""
    if not roots:
        return "holds no certificate"
    if crls is None:
        return "crl.pem does not parse"
    own_subject_in_roots = any(r.startswith("a") for r in roots)
    if "a-forged" in crls and own_subject_in_roots:
        return "signature does not verify"
    if not own_subject_in_roots:
        return "none of them the issuer"
    if "a-expired" in roots:
        return "trust anchor expired"
    if "a-revokes" in crls:
        return "is revoked"
    return None


@pytest.mark.parametrize(("roots_case", "crls_case"), list(itertools.product(ROOTS, CRLS)))
def test_bundle_refusal_over_every_combination_of_roots_and_crls(
    a: CertificateAuthority, b: CertificateAuthority, leaf: IssuedCertificate, roots_case: str, crls_case: str,
) -> None:
    roots, crls = ROOTS[roots_case], CRLS[crls_case]
    certs = {"a": certificate_pem(a.certificate).decode(), "b": certificate_pem(b.certificate).decode(),
             "a-expired": certificate_pem(expired_copy(a)).decode()}
    forged = CertificateAuthority(a.certificate, b.key)  # a's name, another key: the signature cannot verify
    lists = {"a": crl_of(a), "b": crl_of(b), "a-revokes": crl_of(a, [leaf.serial_number]),
             "b-revokes": crl_of(b, [leaf.serial_number]), "a-forged": crl_of(forged)}
    ca_pem = "not a certificate\n" if roots is None else "".join(certs[r] for r in roots)
    crl_text = "-----BEGIN X509 CRL-----\nZ2FyYmFnZQ==\n-----END X509 CRL-----\n" if crls is None else \
        "".join(lists[c] for c in crls)
    why = checks.bundle_refusal(leaf.cert_chain_pem, ca_pem, crl_text, NOW)
    want = expected(roots, crls)
    if want is None:
        assert why is None, (roots_case, crls_case, why)
    else:
        assert why is not None and want in why, (roots_case, crls_case, why)
    # bytes and text are the same input
    assert checks.bundle_refusal(leaf.cert_chain_pem.decode(), ca_pem.encode(), crl_text.encode(), NOW) == why


def test_a_missing_bundle_refuses_every_chain(leaf: IssuedCertificate) -> None:
    for crl in (None, "", "garbage"):
        why = checks.bundle_refusal(leaf.cert_chain_pem, None, crl, NOW)
        assert why is not None and "does not exist" in why


def test_the_other_trust_domains_root_is_named_with_the_missing_issuer(
    a: CertificateAuthority, b: CertificateAuthority, leaf: IssuedCertificate,
) -> None:
    why = checks.bundle_refusal(leaf.cert_chain_pem, b.roots_pem, crl_of(b), NOW)
    assert why is not None
    assert "no path to a trusted root" in why and "meshtls CA b.example" in why and "meshtls CA a.example" in why
    assert "1 root(s)" in why


ALGORITHMS = (KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ECDSA_P384, KeyAlgorithm.ED25519, KeyAlgorithm.RSA_2048)


@pytest.mark.parametrize(("ca_algorithm", "leaf_algorithm"), list(itertools.product(ALGORITHMS, ALGORITHMS)))
def test_chains_verify_whatever_the_key_algorithms(ca_algorithm: KeyAlgorithm, leaf_algorithm: KeyAlgorithm) -> None:
    ca = generate_ca("a.example", NOW - dt.timedelta(days=1), algorithm=ca_algorithm)
    issued = leaf_of(ca, algorithm=leaf_algorithm)
    assert checks.bundle_refusal(issued.cert_chain_pem, ca.roots_pem, crl_of(ca), NOW) is None
    revoked = checks.bundle_refusal(issued.cert_chain_pem, ca.roots_pem, crl_of(ca, [issued.serial_number]), NOW)
    assert revoked is not None and "is revoked" in revoked


def test_a_brought_intermediate_chain_verifies_against_its_root_and_its_own_crl(a: CertificateAuthority) -> None:
    key = KeyAlgorithm.ECDSA_P256
    from meshtls.pki.keys import generate_private_key

    inter_key = generate_private_key(key)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "team intermediate")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(a.certificate.subject)
            .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - HOUR).not_valid_after(NOW + 24 * HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
            .sign(a.key, hashes.SHA256()))  # type: ignore[arg-type]
    inter = CertificateAuthority(cert, inter_key, (a.certificate,))
    issued = leaf_of(inter)
    assert checks.bundle_refusal(issued.cert_chain_pem, a.roots_pem, crl_of(inter), NOW) is None
    why = checks.bundle_refusal(issued.cert_chain_pem, a.roots_pem, crl_of(inter, [issued.serial_number]), NOW)
    assert why is not None and "is revoked" in why
    other = generate_ca("b.example", NOW - dt.timedelta(days=1))
    unknown = checks.bundle_refusal(issued.cert_chain_pem, other.roots_pem, "", NOW)
    assert unknown is not None and "none of them the issuer" in unknown


def test_an_expired_leaf_is_refused(a: CertificateAuthority, leaf: IssuedCertificate) -> None:
    why = checks.bundle_refusal(leaf.cert_chain_pem, a.roots_pem, crl_of(a), NOW + 2 * HOUR)
    assert why is not None and "expired" in why


# --- check_identity names the identity, the bundle and why -----------------------------------------------------------


def identity(serial: str) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "m", "uid": UID},
            "status": {"serialNumber": serial, "conditions": [{"type": "Ready", "status": "True"}]}}


def secret_of(cert: IssuedCertificate) -> SecretSnapshot:
    return SecretSnapshot(exists=True, name="web-mtls",
                          data={"tls.crt": cert.cert_chain_pem, "tls.key": cert.key_pem, "ca.crt": cert.ca_pem},
                          labels={LABEL_MANAGED_BY: MANAGED_BY}, annotations={ANNOTATION_OWNER_UID: UID}, uid="s1")


@pytest.mark.parametrize("case", ["missing", "other-root", "revoked", "ok", "not-judged"])
def test_check_identity_fails_naming_the_identity_and_the_bundle(
    a: CertificateAuthority, b: CertificateAuthority, leaf: IssuedCertificate, case: str,
) -> None:
    bundles: dict[str, dict[str, Any] | None] = {
        "missing": None, "other-root": {"data": {"ca.crt": b.roots_pem.decode(), "crl.pem": crl_of(b)}},
        "revoked": {"data": {"ca.crt": a.roots_pem.decode(), "crl.pem": crl_of(a, [leaf.serial_number])}},
        "ok": {"data": {"ca.crt": a.roots_pem.decode(), "crl.pem": crl_of(a)}}, "not-judged": None,
    }
    name = None if case == "not-judged" else "m/meshtls-bundle"
    verdict = checks.check_identity(identity(leaf.serial_hex), secret_of(leaf), NOW, name, bundles[case])
    if case in ("ok", "not-judged"):
        assert verdict is None
        return
    assert verdict is not None and verdict.failed
    assert verdict.title == "WorkloadIdentity m/web"
    assert verdict.message.startswith(f"bundle m/meshtls-bundle does not verify certificate {leaf.serial_hex}")
    assert {"missing": "does not exist", "other-root": "none of them the issuer",
            "revoked": "is revoked"}[case] in verdict.message


def test_a_secret_ahead_of_its_status_is_told_by_reason_not_by_wording(leaf: IssuedCertificate) -> None:
    verdict = checks.check_identity(identity("ffff"), secret_of(leaf), NOW)
    assert verdict is not None and verdict.reason == checks.SECRET_AHEAD_OF_STATUS
    other = checks.check_identity(identity(leaf.serial_hex), SecretSnapshot(exists=False), NOW)
    assert other is not None and other.reason != checks.SECRET_AHEAD_OF_STATUS
    assert "reason" not in verdict.as_dict()  # what -o json prints is unchanged
