"""The cluster commands' work (declared in `cluster_commands`): status, renew, revoke, inspect, check, watch.

They read and write through `meshtls.kube` only; what they print is built by `render`, what `check` concludes by
`checks`, what `inspect` reports by `inspection` (all pure). Bad input and an unreachable cluster end in one line
on stderr and a non-zero exit (2 for bad input, 1 otherwise), never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.text import Text

from meshtls.api.constants import (
    ANNOTATION_RENEW,
    ANNOTATION_REVOKE,
    DEFAULT_BUNDLE_CONFIGMAP,
    KIND_WORKLOAD_IDENTITY,
    LABEL_IDENTITY,
    LABEL_TRUST_DOMAIN,
)
from meshtls.api.durations import parse_duration
from meshtls.api.objects import ABSENT, SecretSnapshot
from meshtls.cli import checks as verdicts
from meshtls.cli.cluster_commands import WATCHED_REASONS
from meshtls.cli.errors import CommandFailed, UsageError
from meshtls.cli.inspection import inspect_report
from meshtls.cli.render import (
    CheckResult,
    Output,
    check_line,
    check_summary,
    condition,
    event_row,
    identities_table,
    identity_detail,
    identity_detail_data,
    identity_row,
    inspect_renderable,
    watch_line,
)
from meshtls.kube.client import ApiError, Kube, NotFound
from meshtls.kube.queries import (
    HEARTBEAT_LEASE,
    Connection,
    KubeconfigError,
    connect_cli,
    connection_problem,
    kopf_peerings,
    list_bundle_configmaps,
    list_managed_secrets,
    namespace_phases,
    object_events,
    read_crd,
    read_lease,
    server_clock,
    watch_events,
)
from meshtls.pki import (
    PKIError,
    RevocationReason,
    crl_number,
    format_serial,
    load_certificates,
    load_crls,
    svid_spiffe_id,
)

# The injector's names (meshtls.handlers.webhook.CONFIGURATION_NAME and TLS_SECRET); kept here so that `check`
# does not import the webhook server.
WEBHOOK_CONFIGURATION = "meshtls-injector"
WEBHOOK_TLS_SECRET = "meshtls-webhook-tls"
POLL = 0.2  # seconds between reads while waiting for the operator

Command = Callable[[argparse.Namespace, Connection], int]


def _connect(args: argparse.Namespace) -> Connection:
    try:
        return connect_cli(args.kubeconfig, args.context)
    except KubeconfigError as exc:
        raise UsageError(exc.field, exc.message) from None


def validate(args: argparse.Namespace) -> None:
    """Bad input fails (exit 2) before any cluster call."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and parse_duration(str(timeout), "--timeout").total_seconds() <= 0:
        raise UsageError("--timeout", "must be positive")
    if args.command == "renew":
        if bool(args.name) == bool(args.all):
            raise UsageError("NAME", "give one identity's NAME or --all")
        if args.name and args.all_namespaces:
            raise UsageError("-A", "renewing one NAME needs its namespace (-n), or use --all")
    if args.command == "revoke":
        RevocationReason.parse(args.reason, "--reason")
    if args.command == "status" and args.events < 0:
        raise UsageError("--events", "must be 0 or more")


def with_cluster(args: argparse.Namespace, fn: Command) -> int:
    validate(args)
    conn = _connect(args)
    try:
        return fn(args, conn)
    except (UsageError, CommandFailed, PKIError, KeyboardInterrupt, SystemExit):
        raise
    except ApiError as exc:
        raise CommandFailed(f"the API server at {conn.server} refused: {exc}") from None
    except NotFound as exc:
        raise CommandFailed(f"not found: {exc}") from None
    except Exception as exc:
        problem = connection_problem(exc)
        if problem is None:
            raise
        raise CommandFailed(f"cannot reach the Kubernetes API at {conn.server}: {problem}") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _timeout(args: argparse.Namespace) -> float:
    return parse_duration(str(args.timeout), "--timeout").total_seconds()


def _namespace(args: argparse.Namespace, conn: Connection) -> str | None:
    """None for -A; else -n, else the kubeconfig context's namespace."""
    if getattr(args, "all_namespaces", False):
        return None
    return str(args.namespace or conn.namespace)


def _require_namespace(kube: Kube, namespace: str | None) -> None:
    if namespace and not kube.namespace_exists(namespace):
        raise CommandFailed(f"namespace {namespace!r} not found")


def _list_identities(kube: Kube, namespace: str | None) -> list[dict[str, Any]]:
    try:
        return kube.list_workload_identities(namespace)
    except NotFound:
        raise CommandFailed("the WorkloadIdentity CRD is not installed on this cluster "
                            "(kubectl apply -f crds/, or install the Helm chart)") from None


def _get_identity(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    try:
        body = kube.get_workload_identity(namespace, name)
    except NotFound:
        body = None
    if body is None:
        _list_identities(kube, namespace)  # a missing CRD says so
        _require_namespace(kube, namespace)
        raise CommandFailed(f"workloadidentity {namespace}/{name} not found")
    return body


def _secret_name(body: Mapping[str, Any]) -> str:
    return str((body.get("status") or {}).get("secretName") or (body.get("spec") or {}).get("secretName")
               or f"{body['metadata']['name']}-mtls")


def _bundle_name(kube: Kube, trust_domain: str | None) -> str:
    if not trust_domain:
        return DEFAULT_BUNDLE_CONFIGMAP
    try:
        td = kube.get_trust_domain(trust_domain) or {}
    except (NotFound, ApiError):
        td = {}
    return str(((td.get("spec") or {}).get("bundle") or {}).get("configMapName") or DEFAULT_BUNDLE_CONFIGMAP)


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    return str(body["metadata"]["namespace"]), str(body["metadata"]["name"])


# --- status --------------------------------------------------------------------------------------------------------


def status(args: argparse.Namespace, conn: Connection) -> int:
    kube, out, now = conn.kube, Output(args.output), _now()
    namespace = _namespace(args, conn)
    if args.name:
        if namespace is None:
            bodies = [b for b in _list_identities(kube, None) if b["metadata"]["name"] == args.name]
            if not bodies:
                raise CommandFailed(f"no workloadidentity named {args.name!r} in any namespace")
            if len(bodies) > 1:
                return _print_identities(out, bodies, now)
            body = bodies[0]
        else:
            body = _get_identity(kube, namespace, args.name)
        ns, name = _key(body)
        events = object_events(kube, ns, name, KIND_WORKLOAD_IDENTITY)
        if out.data:
            out.dump(identity_detail_data(body, events, now, args.events))
        else:
            out.show(identity_detail(body, events, now, args.events))
        return 0
    bodies = _list_identities(kube, namespace)
    if not bodies:
        _require_namespace(kube, namespace)
    if not bodies and not out.data:
        where = f"namespace {namespace}" if namespace else "any namespace"
        print(f"No WorkloadIdentities found in {where}.", file=sys.stderr)
        return 0
    return _print_identities(out, bodies, now)


def _print_identities(out: Output, bodies: list[dict[str, Any]], now: dt.datetime) -> int:
    rows = sorted((identity_row(b, now) for b in bodies), key=lambda r: (r["namespace"], r["name"]))
    if out.data:
        out.dump({"items": rows})
    else:
        out.show(identities_table(rows, now))
    return 0


# --- renew ---------------------------------------------------------------------------------------------------------


def renew(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    timeout = _timeout(args)
    namespace = _namespace(args, conn)
    if args.name:  # validate() made sure a NAME comes with a namespace
        targets = [_get_identity(kube, str(namespace), args.name)]
    else:
        targets = [b for b in _list_identities(kube, namespace) if not b["metadata"].get("deletionTimestamp")]
        if not targets:
            _require_namespace(kube, namespace)
            raise CommandFailed(f"no WorkloadIdentities in {f'namespace {namespace}' if namespace else 'the cluster'}")
    request = f"{_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    started = time.monotonic()
    for body in targets:
        key = _key(body)
        kube.patch_workload_identity_annotations(*key, {ANNOTATION_RENEW: request})
        pending[key] = {"namespace": key[0], "name": key[1], "request": request,
                        "oldSerial": (body.get("status") or {}).get("serialNumber")}
    if not args.wait:
        return _report(out, list(pending.values()), lambda r: Text(
            f"renewal requested for {r['namespace']}/{r['name']} (request {request})"))
    done: list[dict[str, Any]] = []
    for body in _poll(kube, set(pending), timeout, lambda b: (b.get("status") or {}).get("lastRenewRequest")
                      == request):
        result = pending.pop(_key(body))
        status_ = body.get("status") or {}
        result.update(newSerial=status_.get("serialNumber"), notAfter=status_.get("notAfter"),
                      seconds=round(time.monotonic() - started, 3))
        done.append(result)
        if not out.data:
            out.show(Text(f"{result['namespace']}/{result['name']} renewed in {result['seconds']:.2f} s: serial "
                          f"{result['oldSerial'] or '-'} -> {result['newSerial']} (notAfter {result['notAfter']})"))
    if out.data:
        out.dump({"items": done + [{**p, "newSerial": None, "timedOut": True} for p in pending.values()]})
    if pending:
        raise CommandFailed(_waited_too_long(kube, pending, timeout, "renew"))
    return 0


def _report(out: Output, rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], Text]) -> int:
    if out.data:
        out.dump({"items": rows})
    else:
        for r in rows:
            out.show(line(r))
    return 0


def _poll(kube: Kube, keys: set[tuple[str, str]], timeout: float,
          done: Callable[[dict[str, Any]], bool]) -> Iterator[dict[str, Any]]:
    """Yield each identity's body once `done(body)` holds, reading every POLL seconds until `timeout`."""
    left = set(keys)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        namespaces = {ns for ns, _ in left}
        if len(left) == 1:
            ns, name = next(iter(left))
            found = [b] if (b := kube.get_workload_identity(ns, name)) else []
        elif len(namespaces) == 1:
            found = kube.list_workload_identities(next(iter(namespaces)))
        else:
            found = kube.list_workload_identities(None)
        for body in found:
            key = _key(body)
            if key in left and done(body):
                left.discard(key)
                yield body
        missing = left - {_key(b) for b in found}
        if missing:
            raise CommandFailed(f"workloadidentity {'/'.join(sorted(missing)[0])} was deleted while waiting")
        if left:
            time.sleep(POLL)


def _waited_too_long(kube: Kube, pending: Mapping[tuple[str, str], Any], timeout: float, what: str) -> str:
    names = ", ".join(f"{ns}/{n}" for ns, n in sorted(pending)[:5]) + (" ..." if len(pending) > 5 else "")
    hint = "is the operator running? (meshtls check)"
    ns, name = sorted(pending)[0]
    body = kube.get_workload_identity(ns, name) or {}
    ready = condition(body, "Ready")
    if ready and ready.get("status") != "True":
        hint = f"{ns}/{name} is not Ready: {ready.get('reason')}: {ready.get('message')}"
    return f"timed out after {timeout:.0f} s waiting for the operator to {what} {names}; {hint}"


# --- revoke --------------------------------------------------------------------------------------------------------


def revoke(args: argparse.Namespace, conn: Connection) -> int:
    reason = RevocationReason.parse(args.reason, "--reason")
    kube, out = conn.kube, Output(args.output)
    timeout = _timeout(args)
    namespace = str(args.namespace or conn.namespace)
    body = _get_identity(kube, namespace, args.name)
    secret_name = _secret_name(body)
    secret = kube.read_secret(namespace, secret_name)
    old = _leaf_serial(secret) or (body.get("status") or {}).get("serialNumber")
    if not old:
        raise CommandFailed(f"workloadidentity {namespace}/{args.name} has no certificate to revoke yet")
    trust_domain = (body.get("status") or {}).get("trustDomain") or (body.get("spec") or {}).get("trustDomain")
    bundle = _bundle_name(kube, trust_domain)
    started = time.monotonic()
    kube.patch_workload_identity_annotations(namespace, args.name, {ANNOTATION_REVOKE: reason.value})
    result: dict[str, Any] = {"namespace": namespace, "name": args.name, "reason": reason.value,
                              "revokedSerial": old, "bundle": f"{namespace}/{bundle}"}
    if not args.wait:
        return _report(out, [result], lambda r: Text(
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


# --- inspect -------------------------------------------------------------------------------------------------------


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
        return _print_inspection(Output(args.output), inspect_report(str(path), data, _now(),
                                                                     key_pem=_sibling_key(path)))

    def with_bundle(a: argparse.Namespace, conn: Connection) -> int:
        _require_namespace(conn.kube, a.namespace)
        try:
            td: str | None = svid_spiffe_id(load_certificates(data)[0]).trust_domain
        except PKIError:
            td = None
        name = a.bundle or _bundle_name(conn.kube, td)
        bundle = conn.kube.read_configmap(a.namespace, name)
        return _print_inspection(Output(a.output), inspect_report(str(path), data, _now(), key_pem=_sibling_key(path),
                                                                  bundle=bundle, bundle_name=f"{a.namespace}/{name}"))

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
        _require_namespace(kube, namespace)
        raise CommandFailed(f"secret {namespace}/{args.name} not found")
    if not secret.data.get("tls.crt"):
        raise CommandFailed(f"secret {namespace}/{args.name} has no tls.crt (not a kubernetes.io/tls Secret)")
    name = args.bundle or _bundle_name(kube, secret.labels.get(LABEL_TRUST_DOMAIN))
    bundle = kube.read_configmap(namespace, name)
    try:
        report = inspect_report(f"secret {namespace}/{args.name}", secret.data["tls.crt"], _now(),
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


# --- check ---------------------------------------------------------------------------------------------------------


class _Checks:
    """Collects results; prints each line as soon as it is known (unless -o json/yaml)."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.results: list[CheckResult] = []

    def add(self, *results: CheckResult) -> None:
        for r in results:
            self.results.append(r)
            if not self.out.data:
                self.out.show(check_line(r))

    def guard(self, title: str, fn: Callable[[], None]) -> None:
        """Run one section; an API error there fails that check instead of ending the command."""
        try:
            fn()
        except (ApiError, NotFound) as exc:
            self.add(verdicts.fail(title, f"cannot read: {exc}"))
        except Exception as exc:
            problem = connection_problem(exc)
            if problem is None:
                raise
            self.add(verdicts.fail(title, f"API server unreachable: {problem}"))

    def finish(self) -> int:
        failed = [r for r in self.results if r.failed]
        if self.out.data:
            self.out.dump({"ok": not failed, "checks": [r.as_dict() for r in self.results]})
        else:
            self.out.show(check_summary(self.results))
        return 1 if failed else 0


def check(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    checks = _Checks(out)
    # 1. the API server, and the local clock against it
    before = _now()
    try:
        version, server_date = server_clock(kube)
    except Exception as exc:
        problem = connection_problem(exc) or str(exc)
        checks.add(verdicts.fail("API server", f"cannot reach {conn.server}: {problem}"))
        return checks.finish()
    after = _now()
    checks.add(verdicts.ok("API server", f"{conn.server} ({version}) answered in "
                                         f"{(after - before).total_seconds() * 1000:.0f} ms"))
    clock, skew = verdicts.check_clock(server_date, before, after)
    checks.add(clock)
    server_now = lambda: _now() + skew  # noqa: E731  (the API server's clock, for heartbeats it wrote)

    # 2. CRDs
    crds: dict[str, dict[str, Any] | None] = {}

    def crd_section() -> None:
        for name in verdicts.CRD_NAMES:
            crds[name] = read_crd(kube, name)
        checks.add(verdicts.check_crds(crds))

    checks.guard("CRDs", crd_section)
    crds_ok = bool(checks.results) and not checks.results[-1].failed

    # 3. the operator, 4. the webhook
    checks.guard("operator", lambda: checks.add(_operator_alive(kube, args, server_now())))
    checks.guard("webhook", lambda: checks.add(verdicts.check_webhook(
        kube.read_mutating_webhook_configuration(WEBHOOK_CONFIGURATION),
        kube.read_secret(args.operator_namespace, WEBHOOK_TLS_SECRET), WEBHOOK_CONFIGURATION, _now())))
    if not crds_ok:
        checks.add(verdicts.skip("TrustDomains", "not checked: the CRDs are missing"))
        return checks.finish()

    # 5. trust domains, 6. identities, 7. bundles
    cas: dict[str, tuple[Any, str | None, str]] = {}  # trust domain -> (CA certificate, fingerprint, bundle name)
    checks.guard("TrustDomains", lambda: _check_trust_domains(kube, args.operator_namespace, checks, cas))
    checks.guard("WorkloadIdentities", lambda: _check_identities_and_bundles(kube, args.namespace, checks, cas))
    return checks.finish()


def _operator_alive(kube: Kube, args: argparse.Namespace, server_now: dt.datetime) -> CheckResult:
    """--operator-url when given; else the heartbeat Lease; else kopf's peering object; else a failure."""
    if args.operator_url:
        return _probe(args.operator_url)
    lease = read_lease(kube, args.operator_namespace, HEARTBEAT_LEASE)
    if lease is not None:
        return verdicts.check_lease(lease, server_now)
    peerings = kopf_peerings(kube, args.peering)
    if peerings:
        return verdicts.check_kopf_peering(peerings, server_now)
    return verdicts.fail("operator", f"no heartbeat: no Lease {args.operator_namespace}/{HEARTBEAT_LEASE} and no kopf "
                                     f"peering {args.peering!r}; is the operator running? (or pass --operator-url "
                                     "http://HOST:PORT/healthz)")


def _probe(url: str) -> CheckResult:
    if not url.startswith(("http://", "https://")):
        raise UsageError("--operator-url", f"{url!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            body = response.read(200).decode(errors="replace").strip()
            return verdicts.check_health_probe(url, int(response.status), body[:60])
    except urllib.error.HTTPError as exc:
        return verdicts.check_health_probe(url, exc.code, str(exc.reason))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)
        return verdicts.check_health_probe(url, None, text)


def _check_trust_domains(kube: Kube, operator_namespace: str, checks: _Checks,
                         cas: dict[str, tuple[Any, str | None, str]]) -> None:
    from meshtls.handlers.trust import state_secret_name

    bodies = kube.list_trust_domains()
    if not bodies:
        checks.add(verdicts.fail("TrustDomains", "none: identities cannot be issued (create a TrustDomain)"))
        return
    for body in sorted(bodies, key=lambda b: str(b["metadata"]["name"])):
        name = str(body["metadata"]["name"])
        spec_ca = (body.get("spec") or {}).get("ca") or {}
        ref = (spec_ca.get("secretRef") or {}).get("name")
        secret_name = str(ref) if ref else state_secret_name(name)
        source = f"Secret {operator_namespace}/{secret_name}"
        try:
            secret = kube.read_secret(operator_namespace, secret_name)
        except ApiError as exc:
            secret, source = ABSENT, f"{source}: {exc}"
        ca = verdicts.ca_from_secret(secret, ("tls.crt", "ca.crt") if ref else ("ca.crt",))
        fingerprint = (body.get("status") or {}).get("caFingerprint")
        bundle = str(((body.get("spec") or {}).get("bundle") or {}).get("configMapName") or DEFAULT_BUNDLE_CONFIGMAP)
        cas[name] = (ca, str(fingerprint) if fingerprint else None, bundle)
        checks.add(verdicts.check_trust_domain(body, ca, _now(), source))


def _check_identities_and_bundles(kube: Kube, namespace: str | None, checks: _Checks,
                                  cas: Mapping[str, tuple[Any, str | None, str]]) -> None:
    phases = namespace_phases(kube)
    if namespace and namespace not in phases:
        raise CommandFailed(f"namespace {namespace!r} not found")
    bodies = [b for b in kube.list_workload_identities(namespace)
              if not b["metadata"].get("deletionTimestamp") and phases.get(b["metadata"]["namespace"]) == "Active"]
    secrets = list_managed_secrets(kube, namespace)
    bundles: dict[tuple[str, str], dict[str, Any] | None] = dict(list_bundle_configmaps(kube, namespace))

    def bundle_of(ns: str, cm: str) -> dict[str, Any] | None:
        if (ns, cm) not in bundles:  # not labelled as a bundle (overwritten by someone?): read what is there
            bundles[(ns, cm)] = kube.read_configmap(ns, cm)
        return bundles[(ns, cm)]

    only_td = next(iter(cas)) if len(cas) == 1 else None
    failures: list[CheckResult] = []
    wanted: dict[tuple[str, str], set[str]] = {}  # (namespace, bundle ConfigMap) -> the trust domains it serves
    for body in sorted(bodies, key=_key):
        ns, name = _key(body)
        td = str((body.get("status") or {}).get("trustDomain") or (body.get("spec") or {}).get("trustDomain")
                 or only_td or "")
        bundle_name = cas[td][2] if td in cas else DEFAULT_BUNDLE_CONFIGMAP
        if td:
            wanted.setdefault((ns, bundle_name), set()).add(td)
        secret = secrets.get((ns, _secret_name(body)))
        if secret is None:  # not labelled as ours (tampered, or foreign): read it to say what is there
            secret = kube.read_secret(ns, _secret_name(body))
        verdict = verdicts.check_identity(body, secret, _now(), f"{ns}/{bundle_name}", bundle_of(ns, bundle_name))
        if verdict is not None and verdict.reason == verdicts.SECRET_AHEAD_OF_STATUS:
            # mid-rotation the Secret is written a moment before the status: look again before failing
            time.sleep(1)
            again = kube.get_workload_identity(ns, name)
            if again is not None:
                verdict = verdicts.check_identity(again, kube.read_secret(ns, _secret_name(again)), _now(),
                                                  f"{ns}/{bundle_name}", kube.read_configmap(ns, bundle_name))
        if verdict is not None:
            failures.append(verdict)
    checks.add(*verdicts.summarise("WorkloadIdentities", len(bodies), failures,
                                   "Ready, Secrets match status.serialNumber and their keys, chains verify against "
                                   "their bundle"))
    bundle_failures: list[CheckResult] = []
    pairs = sorted((ns, cm, td) for (ns, cm), tds in wanted.items() for td in tds)
    for ns, cm, td in pairs:
        ca, fingerprint, _ = cas.get(td, (None, None, cm))
        verdict = verdicts.check_bundle(ns, cm, bundle_of(ns, cm), td, ca, fingerprint, _now())
        if verdict is not None:
            bundle_failures.append(verdict)
    checks.add(*verdicts.summarise("bundles", len(pairs), bundle_failures,
                                   "present, CRL current and signed by the CA, ca.crt holds the CA"))


# --- watch ---------------------------------------------------------------------------------------------------------


def watch(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    namespace = _namespace(args, conn)
    _require_namespace(kube, namespace)
    reasons = set(args.reason or WATCHED_REASONS)
    if args.reason is None:
        selector: str | None = f"involvedObject.kind={KIND_WORKLOAD_IDENTITY}"
    else:
        selector = f"reason={args.reason[0]}" if len(reasons) == 1 else None
    if not out.data:
        where = f"namespace {namespace}" if namespace else "all namespaces"
        print(f"watching {', '.join(sorted(reasons))} Events in {where}; Ctrl-C to stop", file=sys.stderr,
              flush=True)
    try:
        for _type, event in watch_events(kube, namespace, selector):
            if event.get("reason") not in reasons:
                continue
            row = event_row(event)
            out.line(row, watch_line(row))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `meshtls watch | head`
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 0
    return 0

