"""`meshtls revoke NAME`: revoke the current certificate, and wait until the CRL lists it and a new one is issued."""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import Any

from rich.text import Text

from meshtls.api.constants import ANNOTATION_REVOKE
from meshtls.api.objects import SecretSnapshot
from meshtls.cli.commands.cluster import POLL, bundle_name_of, get_identity, print_rows, timeout_seconds
from meshtls.cli.errors import CommandFailed
from meshtls.cli.output import Output
from meshtls.cli.views.identities import condition, secret_name_of
from meshtls.kube.queries import Connection
from meshtls.pki import PKIError, RevocationReason, crl_number, format_serial, load_certificates, load_crls


def revoke(args: argparse.Namespace, conn: Connection) -> int:
    reason = RevocationReason.parse(args.reason, "--reason")
    kube, out = conn.kube, Output(args.output)
    timeout = timeout_seconds(args)
    namespace = str(args.namespace or conn.namespace)
    body = get_identity(kube, namespace, args.name)
    secret_name = secret_name_of(body)
    secret = kube.read_secret(namespace, secret_name)
    old = _leaf_serial(secret) or (body.get("status") or {}).get("serialNumber")
    if not old:
        raise CommandFailed(f"workloadidentity {namespace}/{args.name} has no certificate to revoke yet")
    trust_domain = (body.get("status") or {}).get("trustDomain") or (body.get("spec") or {}).get("trustDomain")
    bundle = bundle_name_of(kube, trust_domain)
    started = time.monotonic()
    kube.patch_workload_identity_annotations(namespace, args.name, {ANNOTATION_REVOKE: reason.value})
    result: dict[str, Any] = {"namespace": namespace, "name": args.name, "reason": reason.value,
                              "revokedSerial": old, "bundle": f"{namespace}/{bundle}"}
    if not args.wait:
        return print_rows(out, [result], lambda r: Text(
            f"revocation of {namespace}/{args.name} serial {old} ({reason.value}) requested"))
    deadline = time.monotonic() + timeout
    crl_at: float | None = None
    crl_no: int | None = None
    new: str | None = None
    while time.monotonic() < deadline and (crl_at is None or new is None):
        if crl_at is None:
            crl_no = _crl_lists(kube.read_configmap(namespace, bundle), int(old, 16))
            if crl_no is not None:
                crl_at = time.monotonic() - started
        if new is None:
            current = kube.get_workload_identity(namespace, args.name)
            if current is None:
                raise CommandFailed(f"workloadidentity {namespace}/{args.name} was deleted while waiting")
            serial = (current.get("status") or {}).get("serialNumber")
            if serial and serial != old and condition(current, "Ready").get("status") == "True":
                new = serial
        if crl_at is None or new is None:
            time.sleep(POLL)
    result.update(crlNumber=crl_no, onCrlAfterSeconds=round(crl_at, 3) if crl_at is not None else None,
                  newSerial=new, seconds=round(time.monotonic() - started, 3))
    if crl_at is None or new is None:
        if out.data:
            out.dump(result)
        missing = [] if crl_at is not None else [f"serial {old} on the CRL in {namespace}/{bundle}"]
        missing += [] if new is not None else ["a new serial"]
        raise CommandFailed(f"timed out after {timeout:.0f} s waiting for {' and '.join(missing)} "
                            f"({namespace}/{args.name}); is the operator running? (meshtls check)")
    if out.data:
        out.dump(result)
    else:
        out.show(Text(f"revoked serial {old} ({reason.value}): on CRL #{crl_no} in {namespace}/{bundle} after "
                      f"{crl_at:.2f} s; new serial {new} issued ({result['seconds']:.2f} s)"))
    return 0


def _leaf_serial(secret: SecretSnapshot) -> str | None:
    if not secret.exists or not secret.data.get("tls.crt"):
        return None
    try:
        return format_serial(load_certificates(secret.data["tls.crt"])[0].serial_number)
    except PKIError:
        return None


def _crl_lists(bundle: Mapping[str, Any] | None, serial: int) -> int | None:
    """The CRL number when the bundle's CRL lists `serial`, else None."""
    pem = ((bundle or {}).get("data") or {}).get("crl.pem")
    if not pem:
        return None
    try:
        crls = load_crls(str(pem).encode())
    except PKIError:
        return None
    for crl in crls:
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            return crl_number(crl)
    return None
