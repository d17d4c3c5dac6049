"""A brought CA whose own constraints its SVIDs would violate is refused before any leaf is issued (issue #13)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshtls.pki import PKIError, certificates_pem, check_ca_can_sign_svids, load_ca
from meshtls.pki.keys import private_key_pem

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
TD = "prod.example.org"
DAY = dt.timedelta(days=1)


def make_ca(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, *,
            path_length: int | None = None, key_cert_sign: bool = True, crl_sign: bool = True,
            permitted: list[str] | None = None, excluded: list[str] | None = None,
            validity: dt.timedelta = 365 * DAY) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(minutes=5))
               .not_valid_after(NOW - dt.timedelta(minutes=5) + validity)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
                                            crl_sign=crl_sign, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if permitted is not None or excluded is not None:
        builder = builder.add_extension(x509.NameConstraints(
            [x509.UniformResourceIdentifier(p) for p in permitted] if permitted else None,
            [x509.UniformResourceIdentifier(e) for e in excluded] if excluded else None), critical=True)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def load(chain: list[tuple[x509.Certificate, ec.EllipticCurvePrivateKey]]):  # type: ignore[no-untyped-def]
    """The first is the signing CA, the rest its chain up to the root."""
    return load_ca(certificates_pem([c for c, _ in chain]), private_key_pem(chain[0][1]), NOW)


def test_a_plain_root_and_intermediate_pass() -> None:
    root = make_ca("root")
    check_ca_can_sign_svids(load([root]), TD, DAY)
    inter = make_ca("inter", root, path_length=0)
    check_ca_can_sign_svids(load([inter, root]), TD, DAY)


# Name constraints on URIs: every family of constraint against the trust domain's host
MATCHING = [TD, f".{TD.split('.', 1)[1]}", ".example.org", TD.upper()]
NOT_MATCHING = ["other.example.org", f".{TD}", "example.org", "prod.example.com", ".example.com"]


@pytest.mark.parametrize("where", ["root", "intermediate", "signing"])
@pytest.mark.parametrize("constraint", MATCHING + NOT_MATCHING)
def test_uri_name_constraints_are_judged_for_the_trust_domain(where: str, constraint: str) -> None:
    kinds = {"permitted": constraint in MATCHING, "excluded": constraint not in MATCHING}
    for kind, should_pass in kinds.items():
        args = {kind: [constraint]}
        root = make_ca("root", **(args if where == "root" else {}))
        inter = make_ca("inter", root, **(args if where == "intermediate" else {}))
        signing = make_ca("signing", inter, **(args if where == "signing" else {}))
        ca = load([signing, inter, root])
        if should_pass:
            check_ca_can_sign_svids(ca, TD, DAY)
        else:
            with pytest.raises(PKIError, match=r"name constraint|permits only"):
                check_ca_can_sign_svids(ca, TD, DAY)


def test_an_excluded_constraint_wins_over_a_permitted_one() -> None:
    root = make_ca("root", permitted=[".example.org"], excluded=[TD])
    with pytest.raises(PKIError, match=r"excluding URIs of prod\.example\.org"):
        check_ca_can_sign_svids(load([root]), TD, DAY)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_path_length_below_the_chain_depth_is_refused(depth: int) -> None:
    """A chain of `depth` CAs below the root: every pathLen < CAs below it fails, every other passes."""
    for lengths in itertools.product([None, 0, 1, 2, 3], repeat=depth):
        chain = [make_ca("root", path_length=lengths[0])]
        for i in range(1, depth):
            chain.append(make_ca(f"ca{i}", chain[-1], path_length=lengths[i]))
        chain.append(make_ca("signing", chain[-1]))
        path = list(reversed(chain))  # signing first, root last
        ok = all(length is None or length >= depth - i for i, length in enumerate(lengths))
        if ok:
            check_ca_can_sign_svids(load(path), TD, DAY)
        else:
            with pytest.raises(PKIError, match="pathLen"):
                check_ca_can_sign_svids(load(path), TD, DAY)


def test_a_ca_that_may_not_sign_crls_is_refused() -> None:
    with pytest.raises(PKIError, match="cRLSign"):
        check_ca_can_sign_svids(load([make_ca("root", crl_sign=False)]), TD, DAY)


def test_a_ca_without_key_cert_sign_is_refused_on_load() -> None:
    with pytest.raises(PKIError, match="keyCertSign"):
        load([make_ca("root", key_cert_sign=False)])


@pytest.mark.parametrize("validity,max_ttl,ok", [
    (DAY, DAY, True), (DAY, DAY + dt.timedelta(seconds=1), False), (dt.timedelta(hours=1), DAY, False),
    (30 * DAY, DAY, True), (dt.timedelta(hours=2), dt.timedelta(hours=1), True),
])
def test_a_ca_shorter_lived_than_the_longest_leaf_is_refused(validity: dt.timedelta, max_ttl: dt.timedelta,
                                                              ok: bool) -> None:
    ca = load([make_ca("root", validity=validity)])
    if ok:
        check_ca_can_sign_svids(ca, TD, max_ttl)
    else:
        with pytest.raises(PKIError, match="maxTTL"):
            check_ca_can_sign_svids(ca, TD, max_ttl)
