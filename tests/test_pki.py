from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from testsupport.clock import NOW

from meshtls.pki import (
    CertificateAuthority,
    KeyAlgorithm,
    PKIError,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    generate_ca,
    issue_svid,
    load_ca,
    load_certificates,
    load_crls,
    load_private_key_pem,
    verify_svid,
    workload_spiffe_id,
)
from meshtls.pki.ca import is_self_signed

SID = workload_spiffe_id("example.org", "shop", "web")
HOUR = dt.timedelta(hours=1)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_leaf_is_an_x509_svid(ca: CertificateAuthority, algorithm: KeyAlgorithm) -> None:
    now = NOW
    issued = issue_svid(ca, SID, now, HOUR, ["web.shop.svc"], algorithm)
    cert = issued.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SID)]
    assert san.get_values_for_type(x509.DNSName) == ["web.shop.svc"]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert ku.value.key_encipherment == algorithm.is_rsa
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.serial_number.bit_length() >= 64
    assert cert.not_valid_before_utc <= now - dt.timedelta(seconds=59)  # backdated for clock skew
    assert abs((cert.not_valid_after_utc - now) - HOUR) < dt.timedelta(seconds=1)
    key = load_private_key_pem(issued.key_pem)
    assert key.public_key() == cert.public_key()
    if algorithm.is_rsa:
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == int(algorithm.value.split("-")[1])


def test_leaf_never_outlives_its_ca() -> None:
    now = NOW
    short_ca = generate_ca("example.org", now, validity=dt.timedelta(minutes=30))
    issued = issue_svid(short_ca, SID, now, dt.timedelta(hours=24))
    assert issued.not_after == short_ca.not_after


@settings(max_examples=25, deadline=None)
@given(
    ttl_s=st.integers(min_value=10, max_value=86400),
    dns=st.lists(st.from_regex(r"[a-z]([a-z0-9-]{0,9}[a-z0-9])?\.[a-z]{2,5}", fullmatch=True), max_size=3, unique=True),
    algorithm=st.sampled_from([KeyAlgorithm.ECDSA_P256, KeyAlgorithm.ED25519, KeyAlgorithm.ECDSA_P384]),
)
def test_every_leaf_verifies_against_its_ca_and_not_another(
    ca: CertificateAuthority, other_ca: CertificateAuthority, ttl_s: int, dns: list[str], algorithm: KeyAlgorithm
) -> None:
    now = NOW
    issued = issue_svid(ca, SID, now, dt.timedelta(seconds=ttl_s), dns, algorithm)
    chain = load_certificates(issued.cert_chain_pem)
    good = verify_svid(chain, ca.roots, now)
    assert good.ok, good.reason
    assert good.spiffe_id == SID
    bad = verify_svid(chain, other_ca.roots, now)
    assert not bad.ok and "unknown CA" in (bad.reason or "")
    both = verify_svid(chain, [*other_ca.roots, *ca.roots], now)  # a bundle with several roots
    assert both.ok


def test_expired_and_not_yet_valid_are_rejected(ca: CertificateAuthority) -> None:
    now = NOW
    issued = issue_svid(ca, SID, now, dt.timedelta(minutes=5))
    chain = load_certificates(issued.cert_chain_pem)
    assert "expired" in (verify_svid(chain, ca.roots, now + dt.timedelta(minutes=6)).reason or "")
    assert "not valid yet" in (verify_svid(chain, ca.roots, now - dt.timedelta(minutes=2)).reason or "")


@settings(max_examples=10, deadline=None)
@given(revoked_count=st.integers(min_value=1, max_value=5), kept_count=st.integers(min_value=0, max_value=3))
def test_revoked_serials_fail_and_others_pass(ca: CertificateAuthority, revoked_count: int, kept_count: int) -> None:
    now = NOW
    revoked = [issue_svid(ca, SID, now, HOUR) for _ in range(revoked_count)]
    kept = [issue_svid(ca, SID, now, HOUR) for _ in range(kept_count)]
    entries = [RevokedCertificate(c.serial_number, now, c.not_after, RevocationReason.KEY_COMPROMISE) for c in revoked]
    crl = build_crl(ca, entries, 7, now)
    assert len(crl) == revoked_count
    for c in revoked:
        result = verify_svid(load_certificates(c.cert_chain_pem), ca.roots, now, [crl])
        assert not result.ok and "revoked" in (result.reason or "")
    for c in kept:
        assert verify_svid(load_certificates(c.cert_chain_pem), ca.roots, now, [crl]).ok


def test_expired_entries_leave_the_crl(ca: CertificateAuthority) -> None:
    now = NOW
    entries = [
        RevokedCertificate(1001, now - HOUR, now - dt.timedelta(seconds=1)),  # expired: drops off
        RevokedCertificate(1002, now - HOUR, now + HOUR),
        RevokedCertificate(1002, now - HOUR, now + HOUR),  # duplicates collapse
    ]
    crl = build_crl(ca, entries, 3, now)
    assert [r.serial_number for r in crl] == [1002]
    later = build_crl(ca, entries, 4, now + 2 * HOUR)
    assert len(later) == 0


def test_crl_is_signed_numbered_and_dated(ca: CertificateAuthority) -> None:
    now = NOW
    crl = build_crl(ca, [RevokedCertificate(5, now, now + HOUR, RevocationReason.SUPERSEDED)], 42, now)
    assert crl.is_signature_valid(ca.key.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    assert crl.next_update_utc is not None and crl.next_update_utc > now
    entry = crl.get_revoked_certificate_by_serial_number(5)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded
    (parsed,) = load_crls(crl.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                      fromlist=["Encoding"]).Encoding.PEM))
    assert parsed == crl


def test_a_crl_from_another_ca_is_ignored(ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    now = NOW
    issued = issue_svid(ca, SID, now, HOUR)
    forged = build_crl(other_ca, [RevokedCertificate(issued.serial_number, now, issued.not_after)], 1, now)
    assert verify_svid(load_certificates(issued.cert_chain_pem), ca.roots, now, [forged]).ok


# --- bringing a CA ---------------------------------------------------------------------------------------------


def _intermediate(root: CertificateAuthority, now: dt.datetime) -> CertificateAuthority:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "team intermediate")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(root.certificate.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - HOUR).not_valid_after(now + 24 * HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return CertificateAuthority(cert, key, (root.certificate,))


def test_brought_intermediate_with_chain_issues_verifiable_leaves(ca: CertificateAuthority) -> None:
    now = NOW
    inter = _intermediate(ca, now)
    loaded = load_ca(inter.certificate_pem() + ca.certificate_pem(), inter.key_pem(), now)
    assert not is_self_signed(loaded.certificate)
    assert loaded.roots == [ca.certificate]
    issued = issue_svid(loaded, SID, now, HOUR)
    chain = load_certificates(issued.cert_chain_pem)
    assert len(chain) == 2  # leaf + intermediate, not the root
    assert verify_svid(chain, [ca.certificate], now).ok
    crl = build_crl(loaded, [RevokedCertificate(issued.serial_number, now, issued.not_after)], 1, now)
    assert not verify_svid(chain, [ca.certificate], now, [crl]).ok


def _leaf_as_ca_input(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    issued = issue_svid(ca, SID, NOW, HOUR)
    from meshtls.pki import certificate_pem

    return certificate_pem(issued.certificate), issued.key_pem


@pytest.mark.parametrize("case", ["not-a-ca", "key-mismatch", "expired", "rsa-1024", "chain-does-not-link",
                                  "intermediate-without-chain", "garbage"])
def test_unusable_brought_cas_say_what_is_wrong(ca: CertificateAuthority, other_ca: CertificateAuthority,
                                                case: str) -> None:
    now = NOW
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod

    from meshtls.pki.keys import private_key_pem

    expected = {
        "not-a-ca": ("ca.crt", "is not a CA"),
        "key-mismatch": ("ca.key", "does not match"),
        "expired": ("ca.crt", "expired"),
        "rsa-1024": ("ca.crt", "too weak"),
        "chain-does-not-link": ("chain[0]", "does not link"),
        "intermediate-without-chain": ("chain", "needs its chain"),
        "garbage": ("ca.crt", "no PEM certificate"),
    }[case]
    if case == "not-a-ca":
        cert_pem, key_pem = _leaf_as_ca_input(ca)
    elif case == "key-mismatch":
        cert_pem, key_pem = ca.certificate_pem(), other_ca.key_pem()
    elif case == "expired":
        old = generate_ca("example.org", now - 10 * HOUR, validity=HOUR)
        cert_pem, key_pem = old.certificate_pem(), old.key_pem()
    elif case == "rsa-1024":
        key = rsa_mod.generate_private_key(65537, 1024)
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "weak")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - HOUR).not_valid_after(now + HOUR)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        from meshtls.pki import certificate_pem

        cert_pem, key_pem = certificate_pem(cert), private_key_pem(key)
    elif case == "chain-does-not-link":
        inter = _intermediate(ca, now)
        cert_pem, key_pem = inter.certificate_pem() + other_ca.certificate_pem(), inter.key_pem()
    elif case == "intermediate-without-chain":
        inter = _intermediate(ca, now)
        cert_pem, key_pem = inter.certificate_pem(), inter.key_pem()
    else:
        cert_pem, key_pem = b"hello", ca.key_pem()
    with pytest.raises(PKIError) as err:
        load_ca(cert_pem, key_pem, now)
    assert err.value.field == expected[0], str(err.value)
    assert expected[1] in err.value.message


def test_the_ca_fixtures_are_born_on_the_fixed_clock(ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    """conftest promises a fixed clock: a CA born at the wall clock would let pure tests drift with the date."""
    for authority in (ca, other_ca):
        born = authority.certificate.not_valid_before_utc
        assert NOW - HOUR <= born <= NOW, born
