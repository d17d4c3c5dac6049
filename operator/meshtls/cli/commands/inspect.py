"""`meshtls inspect FILE | secret NAME`: a certificate chain and what the trust bundle and CRL say of it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshtls.api.constants import LABEL_IDENTITY, LABEL_TRUST_DOMAIN
from meshtls.cli.commands.cluster import bundle_name_of, require_namespace, utc_now, with_cluster
from meshtls.cli.errors import CommandFailed, UsageError
from meshtls.cli.inspection import inspect_report
from meshtls.cli.output import Output
from meshtls.cli.views.inspect import inspect_renderable
from meshtls.kube.queries import Connection
from meshtls.pki import PKIError, load_certificates, svid_spiffe_id


def inspect(args: argparse.Namespace) -> int:
    if args.target == "secret":
        if not args.name:
            raise UsageError("NAME", "inspect secret needs the Secret's NAME")
        return with_cluster(args, _inspect_secret)
    if args.name:
        raise UsageError("NAME", f"unexpected {args.name!r}: use 'inspect secret NAME' or 'inspect FILE'")
    path = Path(args.target)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError("FILE", f"{path} does not exist (to inspect a Secret: meshtls inspect secret NAME)") from None
    except IsADirectoryError:
        raise UsageError("FILE", f"{path} is a directory") from None
    except OSError as exc:
        raise UsageError("FILE", f"cannot read {path}: {exc.strerror}") from None
    load_certificates(data, "FILE")  # bad input before any cluster call
    if args.namespace is None:
        return _print_inspection(Output(args.output), inspect_report(str(path), data, utc_now(),
                                                                     key_pem=_sibling_key(path)))

    def with_bundle(a: argparse.Namespace, conn: Connection) -> int:
        require_namespace(conn.kube, a.namespace)
        try:
            td: str | None = svid_spiffe_id(load_certificates(data)[0]).trust_domain
        except PKIError:
            td = None
        name = a.bundle or bundle_name_of(conn.kube, td)
        bundle = conn.kube.read_configmap(a.namespace, name)
        report = inspect_report(str(path), data, utc_now(), key_pem=_sibling_key(path), bundle=bundle,
                                bundle_name=f"{a.namespace}/{name}")
        return _print_inspection(Output(a.output), report)

    return with_cluster(args, with_bundle)


def _sibling_key(path: Path) -> bytes | None:
    """tls.key next to a tls.crt (a mounted Secret or `meshtls pki issue` output), to check the key matches."""
    key = path.with_name("tls.key")
    if path.name == "tls.crt" and key.is_file():
        try:
            return key.read_bytes()
        except OSError:
            return None
    return None


def _inspect_secret(args: argparse.Namespace, conn: Connection) -> int:
    kube = conn.kube
    namespace = str(args.namespace or conn.namespace)
    secret = kube.read_secret(namespace, args.name)
    if not secret.exists:
        require_namespace(kube, namespace)
        raise CommandFailed(f"secret {namespace}/{args.name} not found")
    if not secret.data.get("tls.crt"):
        raise CommandFailed(f"secret {namespace}/{args.name} has no tls.crt (not a kubernetes.io/tls Secret)")
    name = args.bundle or bundle_name_of(kube, secret.labels.get(LABEL_TRUST_DOMAIN))
    bundle = kube.read_configmap(namespace, name)
    try:
        report = inspect_report(f"secret {namespace}/{args.name}", secret.data["tls.crt"], utc_now(),
                                key_pem=secret.data.get("tls.key", b""), bundle=bundle,
                                bundle_name=f"{namespace}/{name}", secret_ca_pem=secret.data.get("ca.crt"))
    except PKIError as exc:
        raise CommandFailed(f"secret {namespace}/{args.name}: {exc}") from None
    identity = secret.labels.get(LABEL_IDENTITY)
    if identity:
        body = kube.get_workload_identity(namespace, identity)
        want = ((body or {}).get("status") or {}).get("serialNumber")
        matches = want == report["serial"]
        report["identity"] = f"{namespace}/{identity}"
        report["checks"].append({
            "title": "identity", "status": "ok" if matches else "fail",
            "message": f"workloadidentity {namespace}/{identity} status.serialNumber matches" if matches
            else (f"workloadidentity {namespace}/{identity} not found" if body is None
                  else f"workloadidentity {namespace}/{identity} status.serialNumber is {want}")})
        report["ok"] = report["ok"] and matches
    return _print_inspection(Output(args.output), report)


def _print_inspection(out: Output, report: dict[str, Any]) -> int:
    if out.data:
        out.dump(report)
    else:
        out.show(inspect_renderable(report))
    return 0 if report["ok"] else 1
