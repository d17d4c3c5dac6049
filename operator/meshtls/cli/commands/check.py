"""`meshtls check`: is meshtls working here? CRDs, clock, operator, webhook, TrustDomains, identities, bundles.

The reading is here; every verdict is a pure function in `cli.checks`."""

from __future__ import annotations

import argparse
import datetime as dt
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from meshtls.api.constants import DEFAULT_BUNDLE_CONFIGMAP
from meshtls.api.names import WEBHOOK_CONFIGURATION, WEBHOOK_TLS_SECRET, state_secret_name
from meshtls.api.objects import ABSENT
from meshtls.cli import checks as verdicts
from meshtls.cli.commands.cluster import identity_key, utc_now
from meshtls.cli.errors import CommandFailed, UsageError
from meshtls.cli.output import Output
from meshtls.cli.views.check import CheckResult, check_line, check_summary
from meshtls.cli.views.identities import secret_name_of
from meshtls.kube.client import ApiError, Kube, NotFound
from meshtls.kube.queries import (
    HEARTBEAT_LEASE,
    Connection,
    connection_problem,
    kopf_peerings,
    list_bundle_configmaps,
    list_managed_secrets,
    namespace_phases,
    read_crd,
    read_lease,
    server_clock,
)


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
    before = utc_now()
    try:
        version, server_date = server_clock(kube)
    except Exception as exc:
        problem = connection_problem(exc) or str(exc)
        checks.add(verdicts.fail("API server", f"cannot reach {conn.server}: {problem}"))
        return checks.finish()
    after = utc_now()
    checks.add(verdicts.ok("API server", f"{conn.server} ({version}) answered in "
                                         f"{(after - before).total_seconds() * 1000:.0f} ms"))
    clock, skew = verdicts.check_clock(server_date, before, after)
    checks.add(clock)
    server_now = lambda: utc_now() + skew  # noqa: E731  (the API server's clock, for heartbeats it wrote)

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
        kube.read_secret(args.operator_namespace, WEBHOOK_TLS_SECRET), WEBHOOK_CONFIGURATION, utc_now())))
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
        checks.add(verdicts.check_trust_domain(body, ca, utc_now(), source))


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
    for body in sorted(bodies, key=identity_key):
        ns, name = identity_key(body)
        td = str((body.get("status") or {}).get("trustDomain") or (body.get("spec") or {}).get("trustDomain")
                 or only_td or "")
        bundle_name = cas[td][2] if td in cas else DEFAULT_BUNDLE_CONFIGMAP
        if td:
            wanted.setdefault((ns, bundle_name), set()).add(td)
        secret = secrets.get((ns, secret_name_of(body)))
        if secret is None:  # not labelled as ours (tampered, or foreign): read it to say what is there
            secret = kube.read_secret(ns, secret_name_of(body))
        verdict = verdicts.check_identity(body, secret, utc_now(), f"{ns}/{bundle_name}", bundle_of(ns, bundle_name))
        if verdict is not None and verdict.reason == verdicts.SECRET_AHEAD_OF_STATUS:
            # mid-rotation the Secret is written a moment before the status: look again before failing
            time.sleep(1)
            again = kube.get_workload_identity(ns, name)
            if again is not None:
                verdict = verdicts.check_identity(again, kube.read_secret(ns, secret_name_of(again)), utc_now(),
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
        verdict = verdicts.check_bundle(ns, cm, bundle_of(ns, cm), td, ca, fingerprint, utc_now())
        if verdict is not None:
            bundle_failures.append(verdict)
    checks.add(*verdicts.summarise("bundles", len(pairs), bundle_failures,
                                   "present, CRL current and signed by the CA, ca.crt holds the CA"))
