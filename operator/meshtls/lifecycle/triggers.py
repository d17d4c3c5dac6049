"""Does this identity need a (new) certificate? A chain of small pure checks, cert-manager style.

Each check returns (reason, message) when it fires, else None; the first that fires names the condition reason
and the Event users see. The clock is an input (`state.now`), so every path is tested without a cluster.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshtls.api.constants import ANNOTATION_RENEW, ANNOTATION_REVOKE
from meshtls.api.durations import format_duration
from meshtls.api.model import EffectiveIdentity
from meshtls.api.objects import SecretSnapshot
from meshtls.lifecycle.certificate import SecretCertificate, authority_key_id, dns_names_of, read_secret_certificate
from meshtls.lifecycle.renewal import JITTER_FRACTION, renewal_time
from meshtls.pki import svid_spiffe_id

ANNOTATION_RENEWAL_TIME = "meshtls.dev/renewal-time"
ANNOTATION_ISSUED_AT = "meshtls.dev/issued-at"


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

    def certificate(self) -> SecretCertificate:
        if self.parsed is None:
            object.__setattr__(self, "parsed", read_secret_certificate(self.secret.data))
        assert self.parsed is not None
        return self.parsed


Trigger = Callable[[IdentityState], tuple[str, str] | None]


def revocation_requested(s: IdentityState) -> tuple[str, str] | None:
    reason = s.annotations.get(ANNOTATION_REVOKE)
    if reason is not None:
        return "RevokeRequested", f"revocation requested ({reason or 'unspecified'}): revoke and re-issue"
    return None


def secret_does_not_exist(s: IdentityState) -> tuple[str, str] | None:
    if not s.secret.exists:
        return "SecretMissing", f"Secret {s.identity.spec.secret_name} does not exist"
    return None


def secret_is_unusable(s: IdentityState) -> tuple[str, str] | None:
    problem = s.certificate().problem
    if problem:
        return "SecretInvalid", f"Secret {s.identity.spec.secret_name} is unusable: {problem}"
    return None


def spiffe_id_differs(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    have = svid_spiffe_id(cert)
    if have != s.identity.spiffe_id:
        return "SpecChanged", f"certificate is for {have}, the identity is {s.identity.spiffe_id}"
    return None


def dns_names_differ(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if sorted(dns_names_of(cert)) != sorted(s.identity.spec.dns_names):
        return "SpecChanged", "dnsNames changed"
    return None


def key_algorithm_differs(s: IdentityState) -> tuple[str, str] | None:
    have = s.certificate().key_algorithm
    if have != s.identity.key_algorithm:
        return "SpecChanged", f"key algorithm is {have}, spec wants {s.identity.key_algorithm}"
    return None


def issuer_changed(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if authority_key_id(cert) != s.ca_key_id:
        return "CAChanged", "certificate was signed by another CA than the one signing now"
    return None


def ttl_differs(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    # A lifetime cut short by the CA's own expiry is expected, not a spec change.
    expected = min(_issued_at(s) + s.identity.ttl, s.ca_not_after)
    if abs(cert.not_valid_after_utc - expected) > dt.timedelta(seconds=2):
        return "SpecChanged", f"ttl changed to {format_duration(s.identity.ttl)}"
    return None


def renew_requested(s: IdentityState) -> tuple[str, str] | None:
    request = s.annotations.get(ANNOTATION_RENEW)
    if request and request != s.handled_renew_request:
        return "RenewRequested", "renewal requested"
    return None


def certificate_expired(s: IdentityState) -> tuple[str, str] | None:
    cert = s.certificate().certificate
    assert cert is not None
    if s.now >= cert.not_valid_after_utc:
        return "Expired", f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return None


def renewal_due(s: IdentityState) -> tuple[str, str] | None:
    due = secret_renewal_time(s)
    if s.now >= due:
        late = s.now - due
        suffix = f", {format_duration(late)} overdue" if late > dt.timedelta(seconds=5) else ""
        return "RenewalDue", f"renewal time {due:%H:%M:%S} reached{suffix}"
    return None


DEFAULT_CHAIN: tuple[Trigger, ...] = (
    revocation_requested,
    secret_does_not_exist,
    secret_is_unusable,
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
    text = s.secret.annotations.get(ANNOTATION_ISSUED_AT)
    if text:
        try:
            return dt.datetime.fromisoformat(text)
        except ValueError:
            pass
    return cert.not_valid_before_utc + s.identity.backdate


def secret_renewal_time(s: IdentityState) -> dt.datetime:
    """The renewal time written on the Secret at issuance (it carries the jitter), else derived again."""
    text = s.secret.annotations.get(ANNOTATION_RENEWAL_TIME)
    if text:
        try:
            return dt.datetime.fromisoformat(text)
        except ValueError:
            pass
    cert = s.certificate().certificate
    assert cert is not None
    return renewal_time(_issued_at(s), cert.not_valid_after_utc, s.identity.renew_at_fraction,
                        s.identity.renew_before, seed=format(cert.serial_number, "x"))


@dataclass(frozen=True)
class Decision:
    action: str  # "issue" | "wait" | "conflict"
    reason: str
    message: str
    recheck_at: dt.datetime | None = None
    revoke_current: bool = False
    on_schedule: bool = False  # a renewal at its due time (not a first issuance, repair, change or late renewal)


ISSUE, WAIT, CONFLICT = "issue", "wait", "conflict"


def decide(state: IdentityState, chain: tuple[Trigger, ...] = DEFAULT_CHAIN) -> Decision:
    """Issue, wait until the renewal time, or refuse: a Secret that is not ours is never overwritten."""
    if state.secret.exists and not state.secret.owned_by(state.uid):
        return Decision(CONFLICT, "SecretConflict",
                        f"Secret {state.identity.spec.secret_name} exists and is not owned by this WorkloadIdentity; "
                        "meshtls will not overwrite it: delete it or choose another spec.secretName")
    for trigger in chain:
        fired = trigger(state)
        if fired:
            reason, message = fired
            return Decision(ISSUE, reason, message, revoke_current=trigger is revocation_requested,
                            on_schedule=trigger is renewal_due and _on_time(state))
    due = secret_renewal_time(state)
    return Decision(WAIT, "Ready", f"certificate valid; renewal at {due:%Y-%m-%dT%H:%M:%SZ}", recheck_at=due)


def event_reason(decision: Decision, had_certificate: bool) -> str:
    """The Event reason users watch for: Issued for a first certificate, Repaired after tampering, else Rotated."""
    if not had_certificate:
        return "Issued"
    if decision.reason in ("SecretMissing", "SecretInvalid"):
        return "Repaired"
    return "Rotated"
