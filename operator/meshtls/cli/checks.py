"""`meshtls check`'s verdicts: each takes what was read from the cluster and a `now`, and returns one CheckResult.

Pure (no API calls), so every verdict is tested with sample bodies; `commands.check` does the reading.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509

from meshtls.api.constants import GROUP, TRUST_DOMAINS, VERSION, WORKLOAD_IDENTITIES
from meshtls.api.model import SpecError, parse_trust_domain
from meshtls.api.names import iso
from meshtls.api.objects import SecretSnapshot
from meshtls.cli.views.check import CheckResult
from meshtls.cli.views.identities import condition, secret_name_of
from meshtls.cli.views.times import human_duration, parse_time
from meshtls.pki import PKIError, crl_number, fingerprint_sha256, format_serial, load_certificates, load_crls
from meshtls.pki.ca import signed_by
from meshtls.pki.verify import verify_svid
from meshtls.policy.certificate import read_secret_certificate

CRD_NAMES = (f"{TRUST_DOMAINS}.{GROUP}", f"{WORKLOAD_IDENTITIES}.{GROUP}")
CLOCK_TOLERANCE = dt.timedelta(seconds=30)
# check_identity's reason when the Secret holds another serial than the status names: mid-rotation the Secret is
# written a moment before the status, so the caller looks once more before reporting it
SECRET_AHEAD_OF_STATUS = "SecretAheadOfStatus"
WEBHOOK_MIN_VALIDITY = dt.timedelta(days=30)


def ok(title: str, message: str) -> CheckResult:
    return CheckResult(title, "ok", message)


def fail(title: str, message: str) -> CheckResult:
    return CheckResult(title, "fail", message)


def skip(title: str, message: str) -> CheckResult:
    return CheckResult(title, "skip", message)


def _left(t: dt.datetime, now: dt.datetime) -> str:
    return f"expired {human_duration(now - t)} ago" if t <= now else f"expires in {human_duration(t - now)}"


# --- CRDs, API server, clock ---------------------------------------------------------------------------------------


def check_crds(crds: Mapping[str, Mapping[str, Any] | None]) -> CheckResult:
    title = "CRDs"
    problems = []
    for name in CRD_NAMES:
        crd = crds.get(name)
        if crd is None:
            problems.append(f"{name} not installed")
            continue
        conditions = {c.get("type"): c for c in (crd.get("status") or {}).get("conditions") or []}
        if (conditions.get("Established") or {}).get("status") != "True":
            problems.append(f"{name} not Established")
        served = [v.get("name") for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served")]
        if VERSION not in served:
            problems.append(f"{name} does not serve {VERSION}")
    if problems:
        return fail(title, "; ".join(problems) + " (kubectl apply -f crds/, or install the Helm chart)")
    return ok(title, f"{', '.join(CRD_NAMES)} established ({VERSION})")


def check_clock(server_date: dt.datetime | None, before: dt.datetime, after: dt.datetime,
                tolerance: dt.timedelta = CLOCK_TOLERANCE) -> tuple[CheckResult, dt.timedelta]:
    """The local clock against the API server's Date header (1 s resolution); returns the skew too: zero when it
    lies within what one request can measure (half a second of resolution and half the round trip), since adding
    an estimate that small to the local clock only adds its error (a heartbeat 2m old read as 1m59s)."""
    title = "clock"
    if server_date is None:
        return skip(title, "the API server sent no Date header: skew not measured"), dt.timedelta(0)
    # The header is truncated to the second: the server's clock is within [date, date + 1 s).
    local = before + (after - before) / 2
    skew = server_date + dt.timedelta(milliseconds=500) - local
    magnitude = abs(skew) - dt.timedelta(milliseconds=500) - (after - before) / 2
    where = "behind" if skew > dt.timedelta(0) else "ahead of"
    text = f"local clock {abs(skew).total_seconds():.1f} s {where} the API server"
    if magnitude > tolerance:
        return fail(title, f"{text} (more than {tolerance.total_seconds():.0f} s): certificates will look "
                           "not-yet-valid or expired; sync NTP"), skew
    return ok(title, f"{text} (within {tolerance.total_seconds():.0f} s)"), \
        skew if magnitude > dt.timedelta(0) else dt.timedelta(0)


# --- the operator --------------------------------------------------------------------------------------------------


def check_health_probe(url: str, status: int | None, detail: str) -> CheckResult:
    title = "operator"
    if status == 200:
        return ok(title, f"{url} answered 200 {detail}".rstrip())
    if status is None:
        return fail(title, f"{url}: {detail} (operator not running?)")
    return fail(title, f"{url} answered {status} {detail}".rstrip())


def check_lease(lease: Mapping[str, Any], now: dt.datetime) -> CheckResult:
    """The operator's heartbeat Lease: fresh while renewTime + leaseDurationSeconds lies ahead (server time)."""
    title = "operator"
    meta = lease.get("metadata") or {}
    where = f"Lease {meta.get('namespace')}/{meta.get('name')}"
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = parse_time(spec.get("renewTime"))
    duration = dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 30))
    if not holder:
        when = f" {human_duration(now - renewed)} ago" if renewed else ""
        return fail(title, f"stopped: {where} was released{when} (clean shutdown)")
    if renewed is None:
        return fail(title, f"{where} (holder {holder}) was never renewed")
    age = now - renewed
    if age > duration:
        return fail(title, f"no heartbeat for {human_duration(age)}: {where} held by {holder} expired "
                           f"{human_duration(age - duration)} ago (operator down or hung?)")
    return ok(title, f"{holder} alive: heartbeat {human_duration(max(age, dt.timedelta(0)))} ago ({where})")


def check_kopf_peering(peerings: Sequence[Mapping[str, Any]], now: dt.datetime) -> CheckResult:
    """kopf's peering objects: {status: {peer-id: {priority, lifetime, lastseen}}}; alive while one peer is fresh."""
    title = "operator"
    fresh: set[str] = set()
    stale: set[str] = set()
    names = []
    for peering in peerings:
        meta = peering.get("metadata") or {}
        where = f"{meta['namespace']}/" if meta.get("namespace") else ""
        names.append(f"{peering.get('kind', 'KopfPeering')} {where}{meta.get('name')}")
        for peer_id, peer in (peering.get("status") or {}).items():
            if not isinstance(peer, Mapping):
                continue
            seen = parse_time(peer.get("lastseen"))
            lifetime = dt.timedelta(seconds=int(peer.get("lifetime") or 60))
            (fresh if seen is not None and seen + lifetime > now else stale).add(str(peer_id))
    what = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
    if fresh:
        return ok(title, f"{len(fresh)} replica(s) alive in {what}: {', '.join(sorted(fresh)[:3])}")
    return fail(title, f"no live replica in {what}" + (f" ({len(stale - fresh)} stale)" if stale else ""))


# --- the webhook ---------------------------------------------------------------------------------------------------


def check_webhook(configuration: Mapping[str, Any] | None, serving: SecretSnapshot | None, name: str,
                  now: dt.datetime, min_validity: dt.timedelta = WEBHOOK_MIN_VALIDITY) -> CheckResult:
    """The injector's configuration: a caBundle that parses and outlives `min_validity`, and, when the serving
    certificate's Secret is readable, a serving certificate signed by that caBundle that outlives it too.

    Not installed is a skip, not a failure: injection is optional (the operator runs without --webhook-port).
    """
    title = "webhook"
    if configuration is None:
        return skip(title, f"MutatingWebhookConfiguration {name} not installed: no sidecar injection "
                           "(run the operator with --webhook-port, or the chart's webhook)")
    hooks = configuration.get("webhooks") or []
    if not hooks:
        return fail(title, f"{name} has no webhooks")
    anchors: dict[str, x509.Certificate] = {}
    for hook in hooks:
        raw = (hook.get("clientConfig") or {}).get("caBundle")
        if not raw:
            return fail(title, f"{name}: webhook {hook.get('name')} has no caBundle")
        try:
            certs = load_certificates(base64.b64decode(raw, validate=True), "caBundle")
        except (PKIError, binascii.Error, ValueError):
            return fail(title, f"{name}: webhook {hook.get('name')}'s caBundle is not a PEM certificate bundle")
        for cert in certs:
            anchors[fingerprint_sha256(cert)] = cert
    soonest = min(anchors.values(), key=lambda c: c.not_valid_after_utc)
    if soonest.not_valid_after_utc - now < min_validity:
        return fail(title, f"{name}: caBundle certificate {soonest.subject.rfc4514_string()} "
                           f"{_left(soonest.not_valid_after_utc, now)} (less than {human_duration(min_validity)})")
    message = f"{name}: {len(hooks)} webhook(s), caBundle {_left(soonest.not_valid_after_utc, now)}"
    if serving is not None and serving.exists and serving.data.get("tls.crt"):
        try:
            cert = load_certificates(serving.data["tls.crt"], "tls.crt")[0]
        except PKIError:
            return fail(title, f"Secret {serving.name}: tls.crt does not parse")
        signed = False
        for anchor in anchors.values():
            try:
                cert.verify_directly_issued_by(anchor)
                signed = True
                break
            except Exception:
                continue
        if not signed:
            return fail(title, f"the serving certificate in Secret {serving.name} is not signed by {name}'s "
                               "caBundle: the API server will refuse the webhook")
        if cert.not_valid_after_utc - now < min_validity:
            return fail(title, f"the serving certificate in Secret {serving.name} "
                               f"{_left(cert.not_valid_after_utc, now)} (restart the operator to renew it)")
        message += f", serving certificate {_left(cert.not_valid_after_utc, now)}"
    failure_policy = {h.get("failurePolicy") for h in hooks}
    return ok(title, message + (f", failurePolicy {'/'.join(sorted(str(p) for p in failure_policy))}"))


# --- TrustDomains --------------------------------------------------------------------------------------------------


def ca_from_secret(secret: SecretSnapshot, keys: tuple[str, ...] = ("ca.crt",)) -> x509.Certificate | None:
    """The first certificate under the first of `keys` present: the signing CA in the operator's state Secret
    (ca.crt), or in a brought CA's Secret (tls.crt, else ca.crt)."""
    for key in keys:
        raw = secret.data.get(key) if secret.exists else None
        if raw:
            try:
                return load_certificates(raw, key)[0]
            except PKIError:
                return None
    return None


def check_trust_domain(body: Mapping[str, Any], ca: x509.Certificate | None, now: dt.datetime,
                       ca_source: str) -> CheckResult:
    """Ready, and its signing CA valid for longer than its rotation window (a CA inside the window FAILS)."""
    name = str((body.get("metadata") or {}).get("name"))
    title = f"TrustDomain {name}"
    ready = condition(body, "Ready")
    if ready.get("status") != "True":
        reason = f"{ready.get('reason')}: {ready.get('message')}" if ready else "no Ready condition yet"
        return fail(title, f"not Ready ({reason})")
    try:
        spec = parse_trust_domain(body)
    except SpecError as exc:
        return fail(title, f"invalid spec: {exc}")
    status = body.get("status") or {}
    if ca is not None:
        not_before, not_after = ca.not_valid_before_utc, ca.not_valid_after_utc
        fingerprint = fingerprint_sha256(ca)
    else:
        status_not_after = parse_time(status.get("caNotAfter"))
        if status_not_after is None or spec.ca_rotate_before is None:
            return fail(title, f"cannot read the CA certificate ({ca_source}) to measure its rotation window")
        not_after, not_before, fingerprint = status_not_after, status_not_after, str(status.get("caFingerprint"))
    window = spec.rotate_before(not_after - not_before)
    left = not_after - now
    short = f"CA sha256:{fingerprint[:12]}"
    if status.get("caFingerprint") and ca is not None and status["caFingerprint"] != fingerprint:
        short += f" (status says sha256:{str(status['caFingerprint'])[:12]})"
    if left <= dt.timedelta(0):
        return fail(title, f"{short} expired at {iso(not_after)}")
    if left <= window:
        phase = (status.get("rotation") or {}).get("phase")
        return fail(title, f"{short} {_left(not_after, now)}, inside its rotation window "
                           f"({human_duration(window)} before expiry)" + (f"; rotation {phase}" if phase else
                                                                          ": rotate the CA"))
    return ok(title, f"Ready; {short} {_left(not_after, now)} (rotation window {human_duration(window)}, "
                     f"starts in {human_duration(left - window)}); CRL #{status.get('crlNumber', '-')}, "
                     f"{status.get('crlEntries', 0)} revoked")


# --- WorkloadIdentities --------------------------------------------------------------------------------------------


def bundle_material(
    bundle: Mapping[str, Any] | None,
) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
    data = (bundle or {}).get("data") or {}
    try:
        roots = load_certificates(str(data.get("ca.crt", "")).encode(), "ca.crt")
    except PKIError:
        roots = []
    try:
        crls = load_crls(str(data.get("crl.pem", "")).encode(), "crl.pem") if data.get("crl.pem") else []
    except PKIError:
        crls = []
    return roots, crls


def check_identity(body: Mapping[str, Any], secret: SecretSnapshot | None, now: dt.datetime,
                   bundle_name: str | None = None, bundle: Mapping[str, Any] | None = None) -> CheckResult | None:
    """Ready; its Secret's leaf is status.serialNumber, unexpired, with the matching key; and, when `bundle_name`
    is given, its chain verifies against that bundle ConfigMap (`bundle`, None when it does not exist) as a sidecar
    would verify it. None when all is well (the caller summarises)."""
    meta = body.get("metadata") or {}
    title = f"WorkloadIdentity {meta.get('namespace')}/{meta.get('name')}"
    ready = condition(body, "Ready")
    if ready.get("status") != "True":
        reason = f"{ready.get('reason')}: {ready.get('message')}" if ready else "no Ready condition yet"
        return fail(title, f"not Ready ({reason})")
    status = body.get("status") or {}
    secret_name = secret_name_of(body)
    if secret is None or not secret.exists:
        return fail(title, f"Secret {secret_name} does not exist")
    if not secret.owned_by(str(meta.get("uid"))):
        return fail(title, f"Secret {secret_name} is not owned by this identity")
    parsed = read_secret_certificate(secret.data)
    if parsed.problem or parsed.certificate is None:
        problem = str(parsed.problem).split(" (")[0]  # cryptography's explanations are long
        return fail(title, f"Secret {secret_name} is unusable: {problem}")
    leaf = parsed.certificate
    serial = format_serial(leaf.serial_number)
    if serial != status.get("serialNumber"):
        return CheckResult(title, "fail", f"Secret {secret_name} holds serial {serial}, status.serialNumber is "
                                          f"{status.get('serialNumber')}", SECRET_AHEAD_OF_STATUS)
    if leaf.not_valid_after_utc <= now:
        return fail(title, f"certificate {serial} in Secret {secret_name} expired at {iso(leaf.not_valid_after_utc)}")
    if bundle_name is not None:
        data = (bundle or {}).get("data") or {}
        why = bundle_refusal(secret.data["tls.crt"], None if bundle is None else str(data.get("ca.crt") or ""),
                             str(data.get("crl.pem") or ""), now)
        if why is not None:
            return fail(title, f"bundle {bundle_name} does not verify certificate {serial} (Secret {secret_name}): "
                               f"{why}")
    return None


def bundle_refusal(chain_pem: bytes | str, ca_pem: bytes | str | None, crl_pem: bytes | str | None,
                   now: dt.datetime) -> str | None:
    """Why a trust bundle (its `ca.crt` and `crl.pem`; `ca_pem` None: there is no bundle) refuses a `tls.crt`
    chain, judged as a sidecar judges a peer: a path to one of its roots, every certificate in date, the leaf not
    on its issuer's CRL. None when the bundle accepts the chain."""
    if ca_pem is None:
        return "the bundle does not exist: sidecars there have no trust anchors"
    text = ca_pem if isinstance(ca_pem, bytes) else ca_pem.encode()
    try:
        roots = load_certificates(text, "ca.crt")
    except PKIError:
        return "its ca.crt holds no certificate"
    try:
        chain = load_certificates(chain_pem if isinstance(chain_pem, bytes) else chain_pem.encode(), "tls.crt")
    except PKIError as exc:
        return f"tls.crt does not parse: {exc.message}"
    crl_text = crl_pem if isinstance(crl_pem, bytes) else (crl_pem or "").encode()
    try:
        crls = load_crls(crl_text, "crl.pem") if crl_text.strip() else []
    except PKIError:
        return "its crl.pem does not parse (sidecars refuse such a bundle)"
    for crl in crls:  # as the sidecar loads a bundle: a root's CRL must verify with that root
        for root in roots:
            if root.subject == crl.issuer and not crl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
                return (f"its crl.pem holds a CRL for {crl.issuer.rfc4514_string()} whose signature does not verify "
                        "(sidecars refuse such a bundle)")
    verdict = verify_svid(chain, roots, now, crls)
    if verdict.ok:
        return None
    if not any(signed_by(cert, root) for cert in chain for root in roots):
        issuer = chain[-1].issuer.rfc4514_string()
        held = ", ".join(sorted({r.subject.rfc4514_string() for r in roots}))
        return f"{verdict.reason}: it holds {len(roots)} root(s) ({held}), none of them the issuer {issuer}"
    return verdict.reason


# --- bundles -------------------------------------------------------------------------------------------------------


def check_bundle(namespace: str, configmap: str, bundle: Mapping[str, Any] | None, trust_domain: str,
                 ca: x509.Certificate | None, ca_fingerprint: str | None, now: dt.datetime) -> CheckResult | None:
    """Present; its CRL parses, is the CA's and is not past nextUpdate; its ca.crt holds the trust domain's CA.
    None when all is well."""
    title = f"bundle {namespace}/{configmap}"
    if bundle is None:
        return fail(title, f"missing (trust domain {trust_domain}): sidecars in {namespace} have no trust anchors")
    data = bundle.get("data") or {}
    try:
        roots = load_certificates(str(data.get("ca.crt", "")).encode(), "ca.crt")
    except PKIError:
        return fail(title, "ca.crt holds no certificate")
    fingerprints = {fingerprint_sha256(r) for r in roots}
    contains = bool(ca_fingerprint and ca_fingerprint in fingerprints)
    if not contains and ca is not None:
        for root in roots:
            try:
                ca.verify_directly_issued_by(root)  # a brought intermediate: its root is in the bundle
                contains = True
                break
            except Exception:
                continue
    if not contains and (ca is not None or ca_fingerprint):
        return fail(title, f"ca.crt does not contain trust domain {trust_domain}'s CA "
                           f"sha256:{(ca_fingerprint or '')[:12]}: its certificates will be refused")
    if not data.get("crl.pem"):
        return fail(title, "no crl.pem: revocations are not enforced")
    try:
        crls = load_crls(str(data["crl.pem"]).encode(), "crl.pem")
    except PKIError:
        return fail(title, "crl.pem does not parse")
    signer = ca
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None and next_update <= now:
            return fail(title, f"CRL #{crl_number(crl)} is past its nextUpdate ({iso(next_update)}): sidecars "
                               "refuse every peer")
        if signer is not None and crl.issuer == signer.subject and not crl.is_signature_valid(
                signer.public_key()):  # type: ignore[arg-type]
            return fail(title, f"CRL #{crl_number(crl)} has a bad signature")
    if signer is not None and not any(c.issuer == signer.subject for c in crls):
        return fail(title, f"no CRL from trust domain {trust_domain}'s CA")
    return None


def summarise(title: str, total: int, failures: Sequence[CheckResult], what: str) -> list[CheckResult]:
    """The failures, one line each; or one line saying all `total` passed; or a skip when there are none."""
    if failures:
        return list(failures)
    if not total:
        return [skip(title, f"none found ({what})")]
    return [ok(title, f"{total} of {total} {what}")]
