"""Does this identity need a (new) certificate? A chain of small pure checks, cert-manager style.

Each check returns (reason, message) when it fires, else None; the first that fires names the condition reason
and the Event users see. The clock is an input (`state.now`), so every path is tested without a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtls.api.constants import ANNOTATION_RENEW, ANNOTATION_REVOKE
from meshtls.api.durations import format_duration
from meshtls.api.model import EffectiveIdentity
from meshtls.api.objects import SecretSnapshot
from meshtls.api.reasons import Reason
from meshtls.pki import PKIError, load_certificates, svid_spiffe_id
from meshtls.pki.ca import signed_by
from meshtls.policy.certificate import SecretCertificate, authority_key_id, dns_names_of, read_secret_certificate
from meshtls.policy.renewal import JITTER_FRACTION, reissue_floor, scheduled_renewal

ANNOTATION_RENEWAL_TIME = "meshtls.dev/renewal-time"  # for people and tools; decisions recompute it from the spec
ANNOTATION_ISSUED_AT = "meshtls.dev/issued-at"
ANNOTATION_ON_SCHEDULE = "meshtls.dev/on-schedule"  # "true"/"false": which jitter window the renewal time used
ANNOTATION_GENERATION = "meshtls.dev/generation"  # the WorkloadIdentity generation the certificate was issued for


@dataclass(frozen=True)
class IdentityState:
    identity: EffectiveIdentity
    uid: str
    annotations: Mapping[str, str]
    handled_renew_request: str | None  # status.lastRenewRequest: the renew annotation value already served
    secret: SecretSnapshot
    ca_key_id: bytes  # SubjectKeyIdentifier of the CA that signs now
    ca_not_after: dt.datetime
    now: dt.datetime
    parsed: SecretCertificate | None = None
    # what the identity's status says meshtls issued last: a Secret is judged against it by content
    issued_serial: str | None = None
    issued_secret_name: str | None = None
    issued_spiffe_id: str | None = None
    issued_not_before: dt.datetime | None = None
    issued_serials: frozenset[str] = frozenset()
    trusted_cas: tuple[x509.Certificate, ...] = ()  # every CA of the trust domain whose leaves are accepted now
    trusted_roots: frozenset[bytes] = frozenset()  # their trust anchors (DER): all ca.crt may carry
    generation: int | None = None  # metadata.generation of the WorkloadIdentity

    def certificate(self) -> SecretCertificate:
        if self.parsed is None:
            object.__setattr__(self, "parsed", read_secret_certificate(self.secret.data))
        assert self.parsed is not None
        return self.parsed


Trigger = Callable[[IdentityState], tuple[str, str] | None]


def revocation_requested(s: IdentityState) -> tuple[str, str] | None:
    reason = s.annotations.get(ANNOTATION_REVOKE)
    if reason is not None:
        return Reason.REVOKE_REQUESTED, f"revocation requested ({reason or 'unspecified'}): revoke and re-issue"
    return None


def secret_does_not_exist(s: IdentityState) -> tuple[str, str] | None:
    if not s.secret.exists:
        if s.issued_secret_name and s.issued_secret_name != s.identity.spec.secret_name:
            return Reason.SPEC_CHANGED, (f"secretName changed from {s.issued_secret_name} to "
                                         f"{s.identity.spec.secret_name}")
        return Reason.SECRET_MISSING, f"Secret {s.identity.spec.secret_name} does not exist"
    return None


def secret_is_unusable(s: IdentityState) -> tuple[str, str] | None:
    problem = s.certificate().problem
    if problem:
        return Reason.SECRET_INVALID, f"Secret {s.identity.spec.secret_name} is unusable: {problem}"
    return None


def certificate_not_issued_here(s: IdentityState) -> tuple[str, str] | None:
    """Judged by content, never by annotations anyone can copy: the signature against the trust domain's CAs,
    the SPIFFE ID and the serial against what the status says meshtls issued."""
    cert = s.certificate().certificate
    assert cert is not None
    name = s.identity.spec.secret_name
    if s.issued_spiffe_id and s.issued_spiffe_id != str(s.identity.spiffe_id):
        return None  # the spec moved (service account, trust domain): the SpecChanged check re-issues anyway
    if s.trusted_cas and not any(signed_by(cert, ca) for ca in s.trusted_cas):
        return Reason.SECRET_TAMPERED, f"Secret {name}: tls.crt is not signed by trust domain {s.identity.trust_domain}"
    if s.trusted_roots:
        try:
            anchors = load_certificates(s.secret.data["ca.crt"], "ca.crt")
        except PKIError as exc:
            return Reason.SECRET_TAMPERED, f"Secret {name}: {exc}"
        if any(a.public_bytes(serialization.Encoding.DER) not in s.trusted_roots for a in anchors):
            return Reason.SECRET_TAMPERED, f"Secret {name}: ca.crt carries a CA that trust domain " \
                                     f"{s.identity.trust_domain} does not trust"
    have = str(svid_spiffe_id(cert))
    if s.issued_spiffe_id and have not in (s.issued_spiffe_id, str(s.identity.spiffe_id)):
        return Reason.SECRET_TAMPERED, (f"Secret {name}: tls.crt is for {have}, meshtls issued it for "
                                        f"{s.issued_spiffe_id}")
    serial = s.certificate().serial
    if s.issued_serial and serial != s.issued_serial:
        older = s.issued_not_before is not None and cert.not_valid_before_utc < s.issued_not_before
        if serial in s.issued_serials or older:  # a newer one is ours, written just before a crash
            return Reason.SECRET_TAMPERED, f"Secret {name}: tls.crt carries serial {serial}, the current one is " \
                                     f"{s.issued_serial}"
    return None


def spiffe_id_differs(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    have = svid_spiffe_id(cert)
    if have != s.identity.spiffe_id:
        return Reason.SPEC_CHANGED, f"certificate is for {have}, the identity is {s.identity.spiffe_id}"
    return None


def dns_names_differ(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if sorted(dns_names_of(cert)) != sorted(s.identity.spec.dns_names):
        return Reason.SPEC_CHANGED, "dnsNames changed"
    return None


def key_algorithm_differs(s: IdentityState) -> tuple[str, str] | None:
    have = s.certificate().key_algorithm
    if have != s.identity.key_algorithm:
        return Reason.SPEC_CHANGED, f"key algorithm is {have}, spec wants {s.identity.key_algorithm}"
    return None


def issuer_changed(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if authority_key_id(cert) != s.ca_key_id:
        return Reason.CA_CHANGED, "certificate was signed by another CA than the one signing now"
    return None


def ttl_differs(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    # A lifetime cut short by the CA's own expiry is expected, not a spec change.
    expected = min(_issued_at(s) + s.identity.ttl, s.ca_not_after)
    if abs(cert.not_valid_after_utc - expected) > dt.timedelta(seconds=2):
        return Reason.SPEC_CHANGED, f"ttl changed to {format_duration(s.identity.ttl)}"
    return None


def renew_requested(s: IdentityState) -> tuple[str, str] | None:
    request = s.annotations.get(ANNOTATION_RENEW)
    if request and request != s.handled_renew_request:
        return Reason.RENEW_REQUESTED, "renewal requested"
    return None


def certificate_expired(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if s.now >= cert.not_valid_after_utc:
        return Reason.EXPIRED, f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return None


def renewal_due(s: IdentityState) -> tuple[str, str] | None:
    due = secret_renewal_time(s)
    if s.now >= due:
        late = s.now - due
        suffix = f", {format_duration(late)} overdue" if late > dt.timedelta(seconds=5) else ""
        return Reason.RENEWAL_DUE, f"renewal time {due:%H:%M:%S} reached{suffix}"
    return None


DEFAULT_CHAIN: tuple[Trigger, ...] = (
    revocation_requested,
    secret_does_not_exist,
    secret_is_unusable,
    certificate_not_issued_here,
    spiffe_id_differs,
    dns_names_differ,
    key_algorithm_differs,
    issuer_changed,
    ttl_differs,
    renew_requested,
    certificate_expired,
    renewal_due,
)


def _on_time(s: IdentityState) -> bool:
    """Renewing within 5 % of the lifetime of the due time: the identity keeps its place in the renewal period."""
    cert = s.certificate().certificate
    assert cert is not None
    lifetime = cert.not_valid_after_utc - _issued_at(s)
    return s.now - secret_renewal_time(s) <= lifetime * JITTER_FRACTION


def _issued_at(s: IdentityState) -> dt.datetime:
    cert = s.certificate().certificate
    assert cert is not None
    issued = _annotation_time(s.secret.annotations.get(ANNOTATION_ISSUED_AT))
    backdated = cert.not_valid_before_utc + s.identity.backdate
    # an annotation outside the certificate's own validity is not believed (it would move the floor and schedule)
    if issued is not None and cert.not_valid_before_utc <= issued <= cert.not_valid_after_utc:
        return issued
    return backdated


def secret_renewal_time(s: IdentityState) -> dt.datetime:
    """The renewal time of the certificate in the Secret under the spec as it is NOW: a changed renewAtPercent,
    renewBefore or ttl moves it at once. The jitter is the serial's, so an unchanged spec gives the time written
    at issuance."""
    cert = s.certificate().certificate
    assert cert is not None

    return _schedule(s)[0]


def renewal_clamped(s: IdentityState) -> bool:
    """Whether the spec asks for a renewal sooner than the re-issue floor allows (the floor holds it back)."""
    return _schedule(s)[1]


def _schedule(s: IdentityState) -> tuple[dt.datetime, bool]:
    cert = s.certificate().certificate
    assert cert is not None

    def under_spec(on_schedule: bool) -> tuple[dt.datetime, bool]:
        return scheduled_renewal(_issued_at(s), cert.not_valid_after_utc, s.identity.renew_at_fraction,
                                 s.identity.renew_before, seed=format(cert.serial_number, "x"),
                                 on_schedule=on_schedule)

    flag = s.secret.annotations.get(ANNOTATION_ON_SCHEDULE)
    if flag in ("true", "false"):
        return under_spec(flag == "true")
    # written before the flag existed: the window that reproduces the recorded time, else the wide one
    recorded = _annotation_time(s.secret.annotations.get(ANNOTATION_RENEWAL_TIME))
    narrow = under_spec(True)
    if recorded is not None and abs(recorded - narrow[0]) <= dt.timedelta(seconds=1):
        return narrow
    return under_spec(False)


def _annotation_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Decision:
    action: str  # "issue" | "wait" | "conflict"
    reason: str
    message: str
    recheck_at: dt.datetime | None = None
    revoke_current: bool = False
    on_schedule: bool = False  # a renewal at its due time (not a first issuance, repair, change or late renewal)
    clamped: bool = False  # the re-issue floor holds back what the spec (or a stuck check) asked for


# What may re-issue sooner than the floor: a user's request, a repair of what someone broke, a new signing CA.
# A spec change counts only for a generation the certificate was not yet issued for: a check that keeps firing
# for the same spec is a loop, and the floor stops it.
EXPLICIT_OR_REPAIR = frozenset({Reason.REVOKE_REQUESTED, Reason.RENEW_REQUESTED, Reason.SECRET_MISSING,
                                Reason.SECRET_INVALID, Reason.SECRET_TAMPERED, Reason.CA_CHANGED})


def _bypasses_floor(s: IdentityState, reason: str) -> bool:
    if reason in EXPLICIT_OR_REPAIR:
        return True
    if reason == Reason.SPEC_CHANGED:
        issued_for = s.secret.annotations.get(ANNOTATION_GENERATION)
        return s.generation is None or issued_for != str(s.generation)
    return False


def floor_time(s: IdentityState) -> dt.datetime:
    """The earliest time the certificate in the Secret may be replaced without an explicit reason."""
    cert = s.certificate().certificate
    assert cert is not None
    issued = _issued_at(s)
    return issued + reissue_floor(cert.not_valid_after_utc - issued)


ISSUE, WAIT, CONFLICT = "issue", "wait", "conflict"


def decide(state: IdentityState, chain: tuple[Trigger, ...] = DEFAULT_CHAIN) -> Decision:
    """Issue, wait until the renewal time, or refuse: a Secret that is not ours is never overwritten."""
    if state.secret.exists and not state.secret.owned_by(state.uid):
        return Decision(CONFLICT, Reason.SECRET_CONFLICT,
                        f"Secret {state.identity.spec.secret_name} exists and is not owned by this WorkloadIdentity; "
                        "meshtls will not overwrite it: delete it or choose another spec.secretName")
    for trigger in chain:
        fired = trigger(state)
        if fired:
            reason, message = fired
            if not _bypasses_floor(state, reason):
                earliest = floor_time(state)
                if state.now < earliest:
                    return Decision(WAIT, Reason.RENEWAL_FLOOR,
                                    f"{message}; held until {earliest:%Y-%m-%dT%H:%M:%SZ} by the re-issue floor "
                                    "(a tenth of the lifetime, at least 1 s)",
                                    recheck_at=earliest, clamped=True)
            return Decision(ISSUE, reason, message, revoke_current=trigger is revocation_requested,
                            on_schedule=trigger is renewal_due and _on_time(state))
    due, clamped = _schedule(state)
    return Decision(WAIT, Reason.READY, f"certificate valid; renewal at {due:%Y-%m-%dT%H:%M:%SZ}", recheck_at=due,
                    clamped=clamped)


def event_reason(decision: Decision, had_certificate: bool) -> str:
    """The Event reason users watch for: Issued for a first certificate, Repaired after tampering, else Rotated."""
    if not had_certificate:
        return Reason.ISSUED
    if decision.reason in (Reason.SECRET_MISSING, Reason.SECRET_INVALID, Reason.SECRET_TAMPERED):
        return Reason.REPAIRED
    return Reason.ROTATED
