"""`meshtls inspect`'s report: a certificate chain, its SPIFFE ID and validity, its key, and whether a namespace's
trust bundle and CRL accept it. Pure: bytes and dicts in, a dict out (drawn by `views.inspect`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from meshtls.api.names import iso
from meshtls.cli.checks import bundle_material, bundle_refusal
from meshtls.cli.views.times import human_duration
from meshtls.pki import (
    PKIError,
    crl_number,
    fingerprint_sha256,
    format_serial,
    load_certificates,
    load_private_key_pem,
    svid_spiffe_id,
    verify_svid,
)
from meshtls.pki.keys import public_keys_match


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def describe(cert: x509.Certificate, index: int) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, uris = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        dns, uris = [], []
    ca = _is_ca(cert)
    return {
        "role": ("root CA" if cert.issuer == cert.subject else "CA") if ca else ("leaf" if index == 0 else "other"),
        "subject": cert.subject.rfc4514_string() or "-",
        "issuer": cert.issuer.rfc4514_string() or "-",
        "serial": format_serial(cert.serial_number),
        "notBefore": iso(cert.not_valid_before_utc),
        "notAfter": iso(cert.not_valid_after_utc),
        "uris": list(uris),
        "dnsNames": list(dns),
        "sha256": fingerprint_sha256(cert),
    }


def validity(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < nb:
        return {"state": "not-yet-valid", "text": f"not valid for another {human_duration(nb - now)} "
                                                  f"(notBefore {iso(nb)}): clock skew?"}
    if now >= na:
        return {"state": "expired", "text": f"expired {human_duration(now - na)} ago ({iso(na)})"}
    lifetime = na - nb
    used = (now - nb) / lifetime if lifetime else 1.0
    return {"state": "valid", "text": f"valid for another {human_duration(na - now)} (until {iso(na)}, "
                                      f"{used:.0%} of its {human_duration(lifetime)} lifetime used)",
            "secondsLeft": round((na - now).total_seconds(), 3)}


def inspect_report(source: str, chain_pem: bytes, now: dt.datetime, key_pem: bytes | None = None,
                   bundle: Mapping[str, Any] | None = None, bundle_name: str | None = None,
                   secret_ca_pem: bytes | None = None) -> dict[str, Any]:
    """Raises PKIError when `chain_pem` holds no certificate."""
    chain = load_certificates(chain_pem, source)
    leaf = chain[0]
    try:
        spiffe_id: str | None = str(svid_spiffe_id(leaf))
    except PKIError:
        spiffe_id = None
    report: dict[str, Any] = {
        "source": source,
        "spiffeID": spiffe_id,
        "serial": format_serial(leaf.serial_number),
        "validity": validity(leaf, now),
        "chain": [describe(c, i) for i, c in enumerate(chain)],
        "keyMatches": None,
        "checks": [],
    }
    checks: list[dict[str, Any]] = report["checks"]
    if key_pem is not None:
        try:
            key = load_private_key_pem(key_pem, "tls.key")
            report["keyMatches"] = public_keys_match(leaf.public_key(), key.public_key())  # type: ignore[arg-type]
        except PKIError:
            report["keyMatches"] = False
            report["keyProblem"] = "tls.key is not a PEM private key"
    if secret_ca_pem is not None:
        try:
            roots = load_certificates(secret_ca_pem, "ca.crt")
            verdict = verify_svid(chain, roots, now)
            checks.append({"title": "Secret ca.crt", "status": "ok" if verdict.ok else "fail",
                           "message": "accepts it" if verdict.ok else f"refuses it: {verdict.reason}"})
        except PKIError:
            checks.append({"title": "Secret ca.crt", "status": "fail", "message": "holds no certificate"})
    if bundle_name is not None:
        if bundle is None:
            checks.append({"title": "bundle", "status": "fail", "message": f"{bundle_name} not found"})
        else:
            _, crls = bundle_material(bundle)
            numbers = ", ".join(f"#{crl_number(c)}" for c in crls) or "none"
            data = bundle.get("data") or {}
            # the same verdict `meshtls check` gives, as a sidecar would judge this chain
            why = bundle_refusal(chain_pem, str(data.get("ca.crt") or ""), str(data.get("crl.pem") or ""), now)
            message = (f"{bundle_name} (CRL {numbers}) accepts it" if why is None
                       else f"{bundle_name} (CRL {numbers}) refuses it: {why}")
            checks.append({"title": "bundle", "status": "ok" if why is None else "fail", "message": message})
            report["revoked"] = any(c.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
                                    for c in crls)
    report["ok"] = (report["validity"]["state"] == "valid" and report["keyMatches"] is not False
                    and all(c["status"] != "fail" for c in checks))
    return report
