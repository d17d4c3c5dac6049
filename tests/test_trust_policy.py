"""Trust domains' pure decisions (issue #13): which trust domain, merged bundles, CRL re-signing, status writes."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtls.api.constants import ANNOTATION_DEFAULT_TRUST_DOMAIN
from meshtls.pki import build_crl, crl_pem, generate_ca, load_certificates, load_crls
from meshtls.policy.clock import FakeClock
from meshtls.policy.issuance import condition
from meshtls.policy.trust_policy import (
    MIN_CRL_RESIGN,
    BundleContribution,
    bundle_matches,
    bundle_trust_domains,
    choose_trust_domain,
    crl_resign_at,
    default_conflict,
    marked_default,
    merge_bundle,
    problem_changed,
    status_patch,
)

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
NAMES = ["a.example", "b.example", "c.example"]


# --- which trust domain --------------------------------------------------------------------------------------------


def all_clusters() -> list[dict[str, bool]]:
    """Every cluster of 0-3 TrustDomains with every combination of default marks."""
    out = []
    for n in range(len(NAMES) + 1):
        for marks in itertools.product([False, True], repeat=n):
            out.append(dict(zip(NAMES[:n], marks, strict=True)))
    return out


@pytest.mark.parametrize("domains", all_clusters(), ids=str)
@pytest.mark.parametrize("requested", [None, "a.example", "gone.example"])
@pytest.mark.parametrize("pinned", [None, "b.example", "gone.example"])
def test_choice_of_trust_domain(domains: dict[str, bool], requested: str | None, pinned: str | None) -> None:
    choice = choose_trust_domain(requested, pinned, domains)
    defaults = [n for n, d in domains.items() if d]
    if requested:
        expected = requested if requested in domains else None
    elif pinned:
        expected = pinned if pinned in domains else None  # the one it was issued under, never another
    elif len(domains) == 1:
        expected = next(iter(domains))
    elif len(defaults) == 1:
        expected = defaults[0]
    else:
        expected = None
    assert choice.name == expected
    if expected is None:
        assert choice.reason == "UnknownTrustDomain"
        named = requested or pinned
        if named:
            assert named in choice.message
        elif len(domains) > 1:  # the message names the choices and why none was taken
            assert all(n in choice.message for n in domains)
            assert ANNOTATION_DEFAULT_TRUST_DOMAIN in choice.message


def test_adding_a_trust_domain_never_moves_a_pinned_identity() -> None:
    """Issue #13 item 6: the identity issued under the only TrustDomain keeps it when a second one appears."""
    first = choose_trust_domain(None, None, {"a.example": False})
    assert first.name == "a.example"
    for second in ({"a.example": False, "b.example": False}, {"a.example": False, "b.example": True}):
        assert choose_trust_domain(None, first.name, second).name == "a.example"


@pytest.mark.parametrize("value,expected", [("true", True), ("True", True), (" TRUE ", True), ("false", False),
                                            ("", False), ("yes", False), ("1", False)])
def test_default_mark(value: str, expected: bool) -> None:
    assert marked_default({ANNOTATION_DEFAULT_TRUST_DOMAIN: value}) is expected
    assert marked_default(None) is False


@pytest.mark.parametrize("domains", all_clusters(), ids=str)
def test_default_conflict_names_every_marked_one_when_more_than_one(domains: dict[str, bool]) -> None:
    marked = sorted(n for n, d in domains.items() if d)
    assert default_conflict(domains) == (marked if len(marked) > 1 else [])


# --- merged bundles ------------------------------------------------------------------------------------------------


def contribution(name: str, revoked: int = 0) -> BundleContribution:
    ca = generate_ca(name, T0)
    from meshtls.pki import RevokedCertificate

    entries = [RevokedCertificate(1000 + i, T0, T0 + dt.timedelta(hours=1)) for i in range(revoked)]
    crl = crl_pem(build_crl(ca, entries, 1, T0)).decode()
    return BundleContribution(name, ca.roots_pem.decode(), crl)


CONTRIBUTIONS = {n: contribution(n, i) for i, n in enumerate(NAMES)}


@pytest.mark.parametrize("subset", [c for n in range(1, 4) for c in itertools.combinations(NAMES, n)], ids=str)
def test_a_merged_bundle_carries_every_root_and_crl_in_a_stable_order(subset: tuple[str, ...]) -> None:
    parts = [CONTRIBUTIONS[n] for n in subset]
    merged = merge_bundle(parts)
    roots = load_certificates(merged["ca.crt"].encode())
    crls = load_crls(merged["crl.pem"].encode())
    assert len(roots) == len(subset) and len(crls) == len(subset)
    assert [r.subject for r in roots] == [load_certificates(CONTRIBUTIONS[n].roots_pem.encode())[0].subject
                                          for n in sorted(subset)]
    for order in itertools.permutations(parts):  # any order of discovery writes the same bytes
        assert merge_bundle(list(order)) == merged
    assert merge_bundle(parts + parts) == merged  # a root twice (a federated bundle carrying ours) once
    assert bundle_trust_domains(parts) == ",".join(sorted(subset))


def test_a_single_trust_domain_bundle_is_its_own_roots_and_crl() -> None:
    part = CONTRIBUTIONS["a.example"]
    assert merge_bundle([part]) == {"ca.crt": part.roots_pem, "crl.pem": part.crls_pem}


def test_bundle_content_judges_tampering() -> None:
    wanted = merge_bundle([CONTRIBUTIONS["a.example"], CONTRIBUTIONS["b.example"]])
    assert bundle_matches(dict(wanted), wanted)
    foreign = CONTRIBUTIONS["c.example"]
    tampered = [None,  # deleted
                {**wanted, "ca.crt": wanted["ca.crt"] + foreign.roots_pem},  # a foreign CA appended
                {**wanted, "crl.pem": foreign.crls_pem},  # CRL replaced
                {"ca.crt": wanted["ca.crt"]},  # CRL removed
                {**wanted, "extra": "x"}]
    for data in tampered:
        assert not bundle_matches(data, wanted)


# --- CRL re-signing, with a fake clock -----------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10 * 24 * 3600))
def test_crls_are_resigned_half_way_and_never_in_a_loop(validity_s: int) -> None:
    clock = FakeClock(T0)
    validity = dt.timedelta(seconds=validity_s)
    due = crl_resign_at(clock.now(), validity)
    assert due - clock.now() >= MIN_CRL_RESIGN  # a 0 s validity must not make a signing loop
    if validity >= 2 * MIN_CRL_RESIGN:
        assert due == T0 + validity / 2  # long before nextUpdate (T0 + validity)
    clock.advance(due - T0)
    assert crl_resign_at(clock.now(), validity) > clock.now()


# --- status: written only on change; lastTransitionTime only on a transition ---------------------------------------


def td_status(now: dt.datetime, ready: bool = True, crl: int = 1) -> dict:  # type: ignore[type-arg]
    return {"caFingerprint": "ab", "crlNumber": crl,
            "conditions": [condition("Ready", ready, "CAReady" if ready else "CASecretMissing", "m", now),
                           condition("CAExpiring", False, "CAValid", "outside", now)]}


def test_an_unchanged_status_is_not_written_again_over_time() -> None:
    clock = FakeClock(T0)
    written = status_patch(None, td_status(clock.now()))
    assert written is not None
    for _ in range(20):  # 20 resyncs, 30 s apart
        clock.advance(dt.timedelta(seconds=30))
        assert status_patch(written, td_status(clock.now())) is None


def test_last_transition_time_moves_only_on_a_transition() -> None:
    clock = FakeClock(T0)
    current = status_patch(None, td_status(clock.now()))
    assert current is not None
    for step, (ready, crl) in enumerate([(True, 2), (False, 2), (False, 3), (True, 3)], start=1):
        clock.advance(dt.timedelta(minutes=1))
        patch = status_patch(current, td_status(clock.now(), ready, crl))
        assert patch is not None  # something changed each step
        before = {c["type"]: c for c in current["conditions"]}
        for c in patch["conditions"]:
            moved = c["lastTransitionTime"] != before[c["type"]]["lastTransitionTime"]
            assert moved == (c["status"] != before[c["type"]]["status"]), (step, c)
        current = {**current, **patch}


def test_problems_are_reported_once_per_change() -> None:
    seen = None
    reports = 0
    for problem in [("CASecretMissing", "x")] * 5 + [("CAInvalid", "y")] * 3 + [("CAInvalid", "z")]:
        if problem_changed(seen, *problem):
            reports += 1
            seen = problem
    assert reports == 3
