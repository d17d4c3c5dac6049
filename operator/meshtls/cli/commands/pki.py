"""`meshtls pki ...`: the PKI core offline, for bringing a CA and for debugging. No cluster needed."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from cryptography import x509

from meshtls.api.durations import check_range, format_duration, parse_duration
from meshtls.cli.errors import Parser, UsageError
from meshtls.cli.files import write_file_atomically, write_files_atomically
from meshtls.pki import (
    CertificateAuthority,
    KeyAlgorithm,
    PKIError,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    crl_number,
    crl_pem,
    fingerprint_sha256,
    format_serial,
    generate_ca,
    issue_svid,
    load_ca,
    load_certificates,
    load_crls,
    parse_spiffe_id,
    svid_spiffe_id,
    verify_svid,
)
from meshtls.pki.crl import entries_from_crl

MIN_OFFLINE_TTL = dt.timedelta(seconds=10)
MAX_OFFLINE_TTL = dt.timedelta(days=366)


def add_pki_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    pki = sub.add_parser("pki", help="offline PKI: make a CA, issue, revoke, inspect (no cluster)")
    cmds = pki.add_subparsers(dest="pki_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("init-ca", help="generate a self-signed root CA for a trust domain")
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--out", required=True, type=Path, help="directory for ca.crt and ca.key")
    p.add_argument("--validity", default="8760h", help="CA lifetime (default 8760h = 1 year)")
    p.add_argument("--key-algorithm", default="ecdsa-p256", help=_algorithms())
    p.add_argument("--force", action="store_true", help="overwrite an existing ca.key")
    p.set_defaults(func=init_ca)

    p = cmds.add_parser("issue", help="issue an X509-SVID (tls.crt with chain, tls.key, ca.crt)")
    p.add_argument("--ca", required=True, type=Path, help="directory with ca.crt and ca.key (and chain.crt)")
    p.add_argument("--spiffe-id", required=True)
    p.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    p.add_argument("--ttl", default="1h", help="lifetime, 10s to 8784h (default 1h)")
    p.add_argument("--key-algorithm", default="ecdsa-p256", help=_algorithms())
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=issue)

    p = cmds.add_parser("revoke", help="add a certificate to the CA's CRL (re-signed, number increased)")
    p.add_argument("--ca", required=True, type=Path)
    p.add_argument("--cert", required=True, type=Path)
    p.add_argument("--crl", required=True, type=Path, help="CRL file to create or update")
    p.add_argument("--reason", default="unspecified", help=", ".join(r.value for r in RevocationReason))
    p.set_defaults(func=revoke)

    p = cmds.add_parser("inspect", help="show a certificate chain or CRL; verify with --ca/--crl")
    p.add_argument("file", type=Path)
    p.add_argument("--ca-file", type=Path, help="trust bundle to verify against")
    p.add_argument("--crl", type=Path, help="CRL to check against (with --ca-file)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=inspect)


def _algorithms() -> str:
    return "one of " + ", ".join(a.value for a in KeyAlgorithm)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(field, f"{path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(field, f"{path} is a directory, expected a file") from None
    except OSError as exc:
        raise UsageError(field, f"cannot read {path}: {exc.strerror}") from None


def _load_ca_dir(directory: Path) -> CertificateAuthority:
    if not directory.is_dir():
        raise UsageError("--ca", f"{directory} is not a directory holding ca.crt and ca.key")
    chain = directory / "chain.crt"
    return load_ca(
        _read(directory / "ca.crt", "--ca"),
        _read(directory / "ca.key", "--ca"),
        _now(),
        chain.read_bytes() if chain.exists() else b"",
    )


def init_ca(args: argparse.Namespace) -> int:
    algorithm = KeyAlgorithm.parse(args.key_algorithm, "--key-algorithm")
    validity = check_range(parse_duration(args.validity, "--validity"), "--validity",
                           dt.timedelta(hours=1), dt.timedelta(days=3650))
    if (args.out / "ca.key").exists() and not args.force:
        raise UsageError("--out", f"{args.out / 'ca.key'} exists; pass --force to replace the CA")
    ca = generate_ca(args.trust_domain, _now(), validity, algorithm)
    write_files_atomically(args.out, {"ca.crt": ca.certificate_pem(), "ca.key": ca.key_pem()},
                           private=frozenset({"ca.key"}))
    print(f"CA for {args.trust_domain} written to {args.out}/ca.crt and ca.key "
          f"(sha256 {ca.fingerprint[:16]}…, expires {ca.not_after:%Y-%m-%d})")
    return 0


def issue(args: argparse.Namespace) -> int:
    spiffe_id = parse_spiffe_id(args.spiffe_id, "--spiffe-id")
    ttl = check_range(parse_duration(args.ttl, "--ttl"), "--ttl", MIN_OFFLINE_TTL, MAX_OFFLINE_TTL)
    algorithm = KeyAlgorithm.parse(args.key_algorithm, "--key-algorithm")
    ca = _load_ca_dir(args.ca)
    if spiffe_id.trust_domain != _ca_trust_domain(ca, spiffe_id.trust_domain):
        raise UsageError("--spiffe-id", f"trust domain {spiffe_id.trust_domain!r} is not the CA's")
    try:
        cert = issue_svid(ca, spiffe_id, _now(), ttl, args.dns, algorithm)
    except PKIError as exc:
        if exc.field == "dnsNames":
            raise UsageError("--dns", exc.message) from None
        raise
    write_files_atomically(
        args.out,
        {"tls.crt": cert.cert_chain_pem, "tls.key": cert.key_pem, "ca.crt": cert.ca_pem},
        private=frozenset({"tls.key"}),
    )
    print(f"issued {spiffe_id} serial {cert.serial_hex} valid until {cert.not_after:%Y-%m-%dT%H:%M:%SZ} "
          f"into {args.out}")
    return 0


def _ca_trust_domain(ca: CertificateAuthority, wanted: str) -> str:
    """The CA's trust domain from its URI SAN; a brought CA without one may sign for any trust domain."""
    try:
        san = ca.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return wanted
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return parse_spiffe_id(uri).trust_domain
    return wanted


def revoke(args: argparse.Namespace) -> int:
    reason = RevocationReason.parse(args.reason, "--reason")
    ca = _load_ca_dir(args.ca)
    leaf = load_certificates(_read(args.cert, "--cert"), "--cert")[0]
    if leaf.issuer != ca.certificate.subject:
        raise UsageError("--cert", "was not issued by this CA")
    now = _now()
    entries: list[RevokedCertificate] = []
    number = 0
    if args.crl.exists():
        crls = load_crls(_read(args.crl, "--crl"), "--crl")
        mine = [c for c in crls if c.is_signature_valid(ca.key.public_key())]
        if not mine:
            raise UsageError("--crl", f"{args.crl} holds no CRL signed by this CA")
        number = crl_number(mine[0])
        # The offline tool keeps no other state; old entries stay until the CA itself expires.
        entries = entries_from_crl(mine[0], ca.not_after)
    entries.append(RevokedCertificate(leaf.serial_number, now, leaf.not_valid_after_utc, reason))
    crl = build_crl(ca, entries, number + 1, now)
    write_file_atomically(args.crl, crl_pem(crl))
    print(f"revoked serial {format_serial(leaf.serial_number)} ({reason.value}); "
          f"{args.crl} is CRL number {number + 1} with {len(crl)} entries")
    return 0


def inspect(args: argparse.Namespace) -> int:
    data = _read(args.file, "FILE")
    if b"BEGIN X509 CRL" in data:
        report: dict[str, Any] = {"crls": [_describe_crl(c) for c in load_crls(data, "FILE")]}
    else:
        chain = load_certificates(data, "FILE")
        report = {"certificates": [_describe_certificate(c) for c in chain]}
        if args.ca_file:
            roots = load_certificates(_read(args.ca_file, "--ca-file"), "--ca-file")
            crls = load_crls(_read(args.crl, "--crl"), "--crl") if args.crl else []
            result = verify_svid(chain, roots, _now(), crls)
            report["verification"] = {"ok": result.ok, "reason": result.reason,
                                      "spiffeId": str(result.spiffe_id) if result.spiffe_id else None}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    verification = report.get("verification")
    return 1 if verification and not verification["ok"] else 0


def _describe_certificate(cert: x509.Certificate) -> dict[str, Any]:
    now = _now()
    try:
        spiffe_id: str | None = str(svid_spiffe_id(cert))
    except PKIError:
        spiffe_id = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        dns, uris = [], []
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    key = cert.public_key()
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format_serial(cert.serial_number),
        "spiffeId": spiffe_id if not is_ca else None,
        "uris": uris,
        "dnsNames": dns,
        "isCA": is_ca,
        "notBefore": cert.not_valid_before_utc.isoformat(),
        "notAfter": cert.not_valid_after_utc.isoformat(),
        "expiresIn": format_duration(cert.not_valid_after_utc - now),
        "keyType": type(key).__name__.removeprefix("_").replace("PublicKey", ""),
        "sha256": fingerprint_sha256(cert),
    }


def _describe_crl(crl: x509.CertificateRevocationList) -> dict[str, Any]:
    return {
        "issuer": crl.issuer.rfc4514_string(),
        "number": crl_number(crl),
        "thisUpdate": crl.last_update_utc.isoformat(),
        "nextUpdate": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "revoked": [{"serial": format_serial(r.serial_number), "at": r.revocation_date_utc.isoformat()} for r in crl],
    }


def _print_report(report: dict[str, Any]) -> None:
    for i, cert in enumerate(report.get("certificates", [])):
        title = "leaf" if i == 0 and not cert["isCA"] else "CA"
        print(f"[{i}] {title}: {cert['subject']}")
        for key in ("spiffeId", "dnsNames", "issuer", "serial", "notBefore", "notAfter", "expiresIn", "keyType",
                    "sha256"):
            if cert.get(key) not in (None, []):
                print(f"    {key}: {cert[key]}")
    for crl in report.get("crls", []):
        print(f"CRL #{crl['number']} by {crl['issuer']}: {len(crl['revoked'])} revoked, "
              f"next update {crl['nextUpdate']}")
        for entry in crl["revoked"]:
            print(f"    {entry['serial']} revoked at {entry['at']}")
    verification = report.get("verification")
    if verification:
        verdict = "OK" if verification["ok"] else f"REJECTED: {verification['reason']}"
        print(f"verification: {verdict}")
