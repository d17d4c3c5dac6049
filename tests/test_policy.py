"""The decision chain with a fake clock: every reason a user can see, without a cluster."""

from __future__ import annotations

import datetime as dt

import pytest

from meshtls.api.constants import ANNOTATION_RENEW, ANNOTATION_REVOKE, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.model import TrustDomainSpec, parse_trust_domain, parse_workload_identity, resolve_identity
from meshtls.api.objects import ABSENT, SecretSnapshot
from meshtls.pki import CertificateAuthority, generate_ca
from meshtls.policy.clock import FakeClock
from meshtls.policy.issuance import issue_for, secret_body, tracked_serials
from meshtls.policy.renewal import JITTER_FRACTION, renewal_time
from meshtls.policy.triggers import CONFLICT, ISSUE, WAIT, IdentityState, decide, event_reason

T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
UID = "uid-1"


@pytest.fixture(scope="module")
def td_ca() -> CertificateAuthority:
    return generate_ca("cluster.local", T0 - dt.timedelta(days=1), validity=dt.timedelta(days=30))


def wid(**spec: object) -> dict[str, object]:
    return {"metadata": {"namespace": "shop", "name": "web", "uid": UID},
            "spec": {"serviceAccountName": "web", **spec}}


def td(**spec: object) -> TrustDomainSpec:
    return parse_trust_domain({"metadata": {"name": "cluster.local"}, "spec": spec})


def secret_from(identity_body: dict[str, object], ca: CertificateAuthority, now: dt.datetime,
                tdspec: TrustDomainSpec | None = None) -> SecretSnapshot:
    identity = resolve_identity(parse_workload_identity(identity_body), tdspec or td())
    issuance = issue_for(identity, ca, now)
    body = secret_body(identity, issuance, {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
                                            "name": "web", "uid": UID})
    meta = body["metadata"]
    return SecretSnapshot(True, meta["name"], {k: v.encode() for k, v in body["stringData"].items()},
                          meta["labels"], meta["annotations"], (UID,))


def state(body: dict[str, object], secret: SecretSnapshot, ca: CertificateAuthority, now: dt.datetime,
          annotations: dict[str, str] | None = None, handled: str | None = None,
          tdspec: TrustDomainSpec | None = None) -> IdentityState:
    identity = resolve_identity(parse_workload_identity(body), tdspec or td())
    return IdentityState(identity, UID, annotations or {}, handled, secret,
                         ca.authority_key_identifier.key_identifier or b"", ca.not_after, now)


def test_no_secret_means_issue_and_the_event_says_issued(td_ca: CertificateAuthority) -> None:
    d = decide(state(wid(), ABSENT, td_ca, T0))
    assert (d.action, d.reason) == (ISSUE, "SecretMissing")
    assert event_reason(d, had_certificate=False) == "Issued"
    assert event_reason(d, had_certificate=True) == "Repaired"


def test_fresh_secret_waits_until_two_thirds_with_jitter(td_ca: CertificateAuthority) -> None:
    clock = FakeClock(T0)
    secret = secret_from(wid(), td_ca, clock.now())
    d = decide(state(wid(), secret, td_ca, clock.now()))
    assert d.action == WAIT and d.recheck_at is not None
    two_thirds = T0 + dt.timedelta(hours=1) * 2 / 3
    assert two_thirds - dt.timedelta(hours=1) * JITTER_FRACTION <= d.recheck_at <= two_thirds
    clock.advance(d.recheck_at - T0)
    due = decide(state(wid(), secret, td_ca, clock.now()))
    assert (due.action, due.reason) == (ISSUE, "RenewalDue")
    assert event_reason(due, had_certificate=True) == "Rotated"


def test_overdue_after_downtime_rotates_at_once_and_says_how_late(td_ca: CertificateAuthority) -> None:
    secret = secret_from(wid(), td_ca, T0)
    d = decide(state(wid(), secret, td_ca, T0 + dt.timedelta(minutes=50)))
    assert d.action == ISSUE and "overdue" in d.message
    expired = decide(state(wid(), secret, td_ca, T0 + dt.timedelta(hours=2)))
    assert expired.reason == "Expired"


def test_renew_before_overrides_the_percentage(td_ca: CertificateAuthority) -> None:
    secret = secret_from(wid(renewBefore="10m"), td_ca, T0)
    d = decide(state(wid(renewBefore="10m"), secret, td_ca, T0))
    assert d.recheck_at is not None
    assert T0 + dt.timedelta(minutes=47) <= d.recheck_at <= T0 + dt.timedelta(minutes=50)


@pytest.mark.parametrize(
    ("new_spec", "message"),
    [
        ({"serviceAccountName": "api"}, "the identity is spiffe://cluster.local/ns/shop/sa/api"),
        ({"dnsNames": ["web.shop.svc"]}, "dnsNames changed"),
        ({"keyAlgorithm": "ed25519"}, "key algorithm"),
        ({"ttl": "30m"}, "ttl changed to 30m"),
    ],
)
def test_spec_changes_reissue_at_once(td_ca: CertificateAuthority, new_spec: dict[str, object], message: str) -> None:
    secret = secret_from(wid(), td_ca, T0)
    d = decide(state(wid(**new_spec), secret, td_ca, T0 + dt.timedelta(seconds=5)))
    assert (d.action, d.reason) == (ISSUE, "SpecChanged")
    assert message in d.message


def test_a_new_ca_reissues(td_ca: CertificateAuthority) -> None:
    secret = secret_from(wid(), td_ca, T0)
    new_ca = generate_ca("cluster.local", T0 - dt.timedelta(days=1))
    d = decide(state(wid(), secret, new_ca, T0 + dt.timedelta(seconds=5)))
    assert (d.action, d.reason) == (ISSUE, "CAChanged")


def test_a_tampered_secret_is_repaired(td_ca: CertificateAuthority) -> None:
    good = secret_from(wid(), td_ca, T0)
    other = secret_from(wid(), td_ca, T0)
    swapped = SecretSnapshot(True, good.name, {**good.data, "tls.key": other.data["tls.key"]}, good.labels,
                             good.annotations, good.owner_uids)
    d = decide(state(wid(), swapped, td_ca, T0))
    assert (d.action, d.reason) == (ISSUE, "SecretInvalid") and "does not match" in d.message
    emptied = SecretSnapshot(True, good.name, {"tls.crt": good.data["tls.crt"]}, good.labels, good.annotations,
                             good.owner_uids)
    assert decide(state(wid(), emptied, td_ca, T0)).reason == "SecretInvalid"


@pytest.mark.parametrize(
    "secret",
    [
        SecretSnapshot(True, "web-mtls", {"password": b"hunter2"}),  # a stranger's Secret
        # another identity's
        SecretSnapshot(True, "web-mtls", {}, {LABEL_MANAGED_BY: MANAGED_BY}, {}, ("someone-else",)),
    ],
)
def test_a_secret_that_is_not_ours_is_never_overwritten(td_ca: CertificateAuthority, secret: SecretSnapshot) -> None:
    d = decide(state(wid(), secret, td_ca, T0))
    assert (d.action, d.reason) == (CONFLICT, "SecretConflict")
    assert "will not overwrite" in d.message


def test_revoke_and_renew_requests(td_ca: CertificateAuthority) -> None:
    secret = secret_from(wid(), td_ca, T0)
    revoke = decide(state(wid(), secret, td_ca, T0, {ANNOTATION_REVOKE: "keyCompromise"}))
    assert revoke.action == ISSUE and revoke.revoke_current and "keyCompromise" in revoke.message
    renew = decide(state(wid(), secret, td_ca, T0, {ANNOTATION_RENEW: "r1"}))
    assert (renew.action, renew.reason) == (ISSUE, "RenewRequested") and not renew.revoke_current
    served = decide(state(wid(), secret, td_ca, T0, {ANNOTATION_RENEW: "r1"}, handled="r1"))
    assert served.action == WAIT


def test_renewal_times_spread_but_never_pass_the_configured_point() -> None:
    lifetime = dt.timedelta(hours=1)
    times = [renewal_time(T0, T0 + lifetime, 2 / 3, seed=str(i)) for i in range(1000)]
    assert max(times) <= T0 + lifetime * 2 / 3
    assert min(times) >= T0 + lifetime * (2 / 3 - JITTER_FRACTION)
    assert len({t.replace(microsecond=0) for t in times}) > 150  # not one second for all
    assert renewal_time(T0, T0 + lifetime, 2 / 3, seed="x") == renewal_time(T0, T0 + lifetime, 2 / 3, seed="x")


def test_short_ttl_is_backdated_less_than_its_lifetime(td_ca: CertificateAuthority) -> None:
    tdspec = td(certificates={"minTTL": "10s"})
    identity = resolve_identity(parse_workload_identity(wid(ttl="20s")), tdspec)
    issuance = issue_for(identity, td_ca, T0)
    assert issuance.certificate.not_before >= T0 - dt.timedelta(seconds=5)
    assert issuance.renewal_time < issuance.certificate.not_after


def test_tracked_serials_keep_only_unexpired(td_ca: CertificateAuthority) -> None:
    identity = resolve_identity(parse_workload_identity(wid()), td())
    issuance = issue_for(identity, td_ca, T0)
    old = [{"serial": "aa", "notAfter": "2026-11-27T11:00:00Z"}, {"serial": "bb", "notAfter": "2026-11-27T13:00:00Z"}]
    assert [e["serial"] for e in tracked_serials(old, issuance, T0)] == ["bb", issuance.serial]


def test_off_schedule_issuances_spread_over_the_renewal_period_and_stay_spread() -> None:
    """1,000 identities created in the same second: over a day of 1 h certificates, the busiest minute of
    renewals stays under twice the average minute (the thundering-herd goal)."""
    import collections
    import random

    rng = random.Random(7)
    lifetime = dt.timedelta(hours=1)
    per_minute: collections.Counter[int] = collections.Counter()
    first: list[float] = []
    for i in range(1000):
        issued, on_schedule = T0, False
        while True:
            seed = f"{i}-{rng.random()}"
            due = renewal_time(issued, issued + lifetime, 2 / 3, seed=seed, on_schedule=on_schedule)
            if due > T0 + dt.timedelta(hours=24):
                break
            per_minute[int((due - T0).total_seconds() // 60)] += 1
            if not on_schedule:
                first.append((due - issued) / lifetime)
            issued, on_schedule = due, True
    minutes = [per_minute[m] for m in range(60, 24 * 60)]  # after the first hour, as a running cluster sees it
    average = sum(minutes) / len(minutes)
    assert max(minutes) <= 2 * average, (max(minutes), average)
    assert min(first) >= 0.1 and max(first) <= 2 / 3  # first renewals between 1/10 and 2/3 of the lifetime


def test_only_a_renewal_on_time_keeps_the_narrow_jitter(td_ca: CertificateAuthority) -> None:
    secret = secret_from(wid(), td_ca, T0)
    on_time = decide(state(wid(), secret, td_ca, T0 + dt.timedelta(minutes=40)))
    assert on_time.reason == "RenewalDue" and on_time.on_schedule
    late = decide(state(wid(), secret, td_ca, T0 + dt.timedelta(minutes=50)))
    assert late.reason == "RenewalDue" and not late.on_schedule
    assert not decide(state(wid(), ABSENT, td_ca, T0)).on_schedule


def test_every_rotation_step_is_a_named_action_and_phases_are_named() -> None:
    """The CA rotation's state machine speaks RotationPhase/RotationAction only (its docstring listed no `warn`)."""
    import itertools

    from meshtls.policy.ca_rotation import RotationAction, RotationPhase, RotationState, next_rotation_step

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    not_after, window, delay = t0 + dt.timedelta(days=365), dt.timedelta(days=100), dt.timedelta(seconds=90)
    seen = set()
    for phase, offset, request, waiting, can_generate in itertools.product(
            RotationPhase, (dt.timedelta(0), dt.timedelta(days=300), dt.timedelta(days=400)), (None, "r1"),
            (False, True), (False, True)):
        state = RotationState(phase, t0, t0 + dt.timedelta(days=1) if phase == RotationPhase.ROTATING else None)
        step = next_rotation_step(state, t0 + offset, not_after, window, delay, request=request,
                                  replacement_waiting=waiting, can_generate=can_generate)
        assert isinstance(step.action, RotationAction), step
        seen.add(step.action)
    assert seen == set(RotationAction)
    assert RotationState.from_json(RotationState(RotationPhase.PREPARING, t0).to_json()).phase == "Preparing"
