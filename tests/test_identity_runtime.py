"""The WorkloadIdentity at run time, with a fake clock: the re-issue floor, a schedule that follows the spec,
Secrets judged by content, what a spec change leaves behind, sidecar configs too large to publish, overlapping
identities and terminating namespaces. No cluster."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshtls.api.constants import ANNOTATION_RENEW, ANNOTATION_REVOKE, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.model import (
    EffectiveIdentity,
    SpecError,
    parse_trust_domain,
    parse_workload_identity,
    resolve_identity,
)
from meshtls.api.objects import ABSENT, SecretSnapshot
from meshtls.injection.render import CONFIGMAP_DATA_LIMIT, check_publishable, render_sidecar_config
from meshtls.injection.targets import PodSelectionIndex, selectors_overlap
from meshtls.pki import CertificateAuthority, generate_ca, load_certificates
from meshtls.policy.clock import FakeClock
from meshtls.policy.issuance import (
    Issuance,
    floor_condition,
    issue_for,
    issued_status,
    overlap_condition,
    revocations_by_issuer,
    secret_body,
    secret_digest,
    superseded_by_spec,
)
from meshtls.policy.namespaces import namespace_terminating
from meshtls.policy.renewal import reissue_floor, renewal_time
from meshtls.policy.triggers import ISSUE, WAIT, IdentityState, decide

T0 = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
UID = "uid-1"
OWNER = {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity", "name": "web", "uid": UID}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return generate_ca("cluster.local", T0 - dt.timedelta(days=1), validity=dt.timedelta(days=4 * 365))


@pytest.fixture(scope="module")
def short_ca() -> CertificateAuthority:
    """A CA that expires before the leaves' TTL: it cuts their lifetime short."""
    return generate_ca("cluster.local", T0 - dt.timedelta(days=1), validity=dt.timedelta(days=1, hours=2))


def body(**spec: object) -> dict[str, object]:
    return {"metadata": {"namespace": "shop", "name": "web", "uid": UID},
            "spec": {"serviceAccountName": "web", **spec}}


def effective(ttl: dt.timedelta | None = None, renew_before: dt.timedelta | None = None,
              fraction: float | None = None, **spec: object) -> EffectiveIdentity:
    """A resolved identity; ttl/renewBefore/fraction are forced past validation, as an older CRD lets them in."""
    tdspec = parse_trust_domain({"metadata": {"name": "cluster.local"}, "spec": {}})
    identity = resolve_identity(parse_workload_identity(body(**spec)), tdspec)
    changes: dict[str, object] = {}
    if ttl is not None:
        changes.update(ttl=ttl, backdate=min(identity.backdate, ttl / 4))
    if renew_before is not None:
        changes["renew_before"] = renew_before
    if fraction is not None:
        changes["renew_at_fraction"] = fraction
    return dataclasses.replace(identity, **changes)  # type: ignore[arg-type]


def snapshot(identity: EffectiveIdentity, issuance: Issuance, generation: int | None = 1) -> SecretSnapshot:
    b = secret_body(identity, issuance, OWNER, generation)
    meta = b["metadata"]
    return SecretSnapshot(True, meta["name"], {k: v.encode() for k, v in b["stringData"].items()}, meta["labels"],
                          meta["annotations"], (UID,))


def look(identity: EffectiveIdentity, secret: SecretSnapshot, ca: CertificateAuthority, now: dt.datetime,
         annotations: dict[str, str] | None = None, generation: int | None = 1, status: dict[str, object] | None = None,
         trusted: tuple[x509.Certificate, ...] | None = None) -> IdentityState:
    status = status or {}
    return IdentityState(
        identity, UID, annotations or {}, None, secret, ca.authority_key_identifier.key_identifier or b"",
        ca.not_after, now, issued_serial=status.get("serialNumber"),  # type: ignore[arg-type]
        issued_spiffe_id=status.get("spiffeID"),  # type: ignore[arg-type]
        issued_secret_name=status.get("secretName"),  # type: ignore[arg-type]
        issued_not_before=(dt.datetime.fromisoformat(str(status["notBefore"]).replace("Z", "+00:00"))
                           if status.get("notBefore") else None),
        issued_serials=frozenset(e["serial"] for e in status.get("activeSerials") or []),  # type: ignore[attr-defined]
        trusted_cas=(ca.certificate,) if trusted is None else trusted,
        trusted_roots=frozenset(r.public_bytes(serialization.Encoding.DER) for r in ca.roots) if trusted is None
        else frozenset(), generation=generation)


# --- the re-issue floor -------------------------------------------------------------------------------------------

TTLS = [dt.timedelta(seconds=1), dt.timedelta(seconds=10), dt.timedelta(minutes=5), dt.timedelta(hours=1),
        dt.timedelta(hours=24), dt.timedelta(days=90)]  # 1 s and 90 d: outside the API's range; 90 d outlives the CA


def schedule_combinations() -> list[tuple[dt.timedelta, dt.timedelta | None, float | None, dt.timedelta]]:
    """(ttl, renewBefore, renewAtFraction, requested offset from issuance) over classes: the default, sane points,
    points at and below the floor, a renewal point at issuance, and points the API server refuses (renewBefore >=
    ttl, percentages outside 10-95)."""
    out = []
    for ttl in TTLS:
        for rb in [dt.timedelta(0), ttl * 0.01, ttl * 0.5, ttl * 0.89, ttl * 0.95, ttl - dt.timedelta(seconds=1),
                   ttl, ttl * 2]:
            out.append((ttl, rb, None, ttl - rb))
        for pct in [0.0, 0.01, 0.05, 0.1, 0.5, 2 / 3, 0.95, 0.99, 1.0, 1.5]:
            out.append((ttl, None, pct, ttl * pct))
    return out


@pytest.mark.parametrize("cut_by_ca", [False, True], ids=["ca-outlives", "ca-cuts-lifetime"])
@pytest.mark.parametrize(("ttl", "renew_before", "fraction", "requested"), schedule_combinations(),
                         ids=lambda v: str(v))
def test_no_schedule_reissues_more_often_than_the_floor(ca: CertificateAuthority, short_ca: CertificateAuthority,
                                                        ttl: dt.timedelta, renew_before: dt.timedelta | None,
                                                        fraction: float | None, requested: dt.timedelta,
                                                        cut_by_ca: bool) -> None:
    identity = effective(ttl, renew_before, fraction)
    signer = short_ca if cut_by_ca else ca
    clock = FakeClock(T0)
    secret, issued = ABSENT, []
    decisions = 0
    wanted = 12
    while len(issued) < wanted and decisions < 200:  # a hot loop shows up as many issuances at one instant
        if clock.now() >= signer.not_after - dt.timedelta(seconds=1):
            wanted = len(issued)  # the trust domain rotates its CA before this; nothing to judge after
            break
        decisions += 1
        d = decide(look(identity, secret, signer, clock.now()))
        if d.action == ISSUE:
            issuance = issue_for(identity, signer, clock.now(), on_schedule=d.on_schedule)
            secret = snapshot(identity, issuance)
            issued.append(issuance)
            continue
        assert d.action == WAIT and d.recheck_at is not None
        assert d.recheck_at > clock.now(), "a recheck in the past is a hot loop"
        clock.advance(d.recheck_at - clock.now())
    assert len(issued) == wanted and issued, f"stopped issuing after {len(issued)} ({decisions} decisions)"
    for before, after in itertools.pairwise(issued):
        lifetime = before.certificate.not_after - before.issued_at
        assert after.issued_at - before.issued_at >= reissue_floor(lifetime), (before.issued_at, after.issued_at)
    lifetime = issued[0].certificate.not_after - issued[0].issued_at
    floor = reissue_floor(lifetime)
    # the clamp is reported exactly when the spec asked for a point below the floor (or the lifetime is so short
    # that the last moments before expiry are below it)
    asked = min(requested, lifetime - min(dt.timedelta(seconds=2), lifetime / 4))
    if lifetime == ttl:  # (a lifetime cut by the CA moves the renewal point: the clamp is judged on full ones)
        assert issued[0].clamped == (asked < floor)
    # well clear of the floor: the schedule keeps the certificate valid until it is renewed
    if asked >= floor * 1.2 and lifetime == ttl:
        for before, after in itertools.pairwise(issued):
            assert after.issued_at < before.certificate.not_after


def test_the_hot_loop_of_the_probe_is_held_to_the_floor(ca: CertificateAuthority) -> None:
    """ttl 1h, renewBefore 59m59s: rotated ~10 times a second before; now once every 6 minutes."""
    identity = effective(dt.timedelta(hours=1), dt.timedelta(minutes=59, seconds=59))
    issuance = issue_for(identity, ca, T0, on_schedule=False)
    assert issuance.clamped and issuance.renewal_time >= T0 + dt.timedelta(minutes=6)
    secret = snapshot(identity, issuance)
    for seconds in (0, 1, 60, 359):
        d = decide(look(identity, secret, ca, T0 + dt.timedelta(seconds=seconds)))
        assert d.action == WAIT and d.clamped, seconds
    assert decide(look(identity, secret, ca, T0 + dt.timedelta(minutes=6, seconds=1))).action == ISSUE


def explicit_actions(identity: EffectiveIdentity, ca: CertificateAuthority,
                     secret: SecretSnapshot) -> list[tuple[str, dict[str, object]]]:
    other = issue_for(effective(), ca, T0)
    return [
        ("RenewRequested", {"annotations": {ANNOTATION_RENEW: "r1"}}),
        ("RevokeRequested", {"annotations": {ANNOTATION_REVOKE: "keyCompromise"}}),
        ("SecretMissing", {"secret": ABSENT}),
        ("SecretInvalid", {"secret": dataclasses.replace(secret, data={**secret.data,
                                                                       "tls.key": other.certificate.key_pem})}),
        ("CAChanged", {"ca": generate_ca("cluster.local", T0 - dt.timedelta(days=1)), "trusted": ()}),
        ("SpecChanged", {"identity": effective(dt.timedelta(hours=1), dt.timedelta(minutes=59, seconds=59),
                                               serviceAccountName="api"), "generation": 2}),
    ]


def test_explicit_actions_and_repairs_pass_the_floor_a_stuck_check_does_not(ca: CertificateAuthority) -> None:
    identity = effective(dt.timedelta(hours=1), dt.timedelta(minutes=59, seconds=59))
    secret = snapshot(identity, issue_for(identity, ca, T0))
    just_after = T0 + dt.timedelta(seconds=1)
    for reason, change in explicit_actions(identity, ca, secret):
        state = look(change.get("identity", identity), change.get("secret", secret),  # type: ignore[arg-type]
                     change.get("ca", ca), just_after, change.get("annotations"),  # type: ignore[arg-type]
                     generation=change.get("generation", 1), trusted=change.get("trusted"))  # type: ignore[arg-type]
        d = decide(state)
        assert (d.action, d.reason) == (ISSUE, reason), (reason, d)
    # a spec check that keeps firing for the generation the certificate was issued for is a loop: held back
    same_generation = effective(dt.timedelta(minutes=30), dt.timedelta(minutes=1))
    held = decide(look(same_generation, secret, ca, just_after, generation=1))
    assert (held.action, held.reason, held.clamped) == (WAIT, "RenewalFloor", True)
    assert held.recheck_at == T0 + dt.timedelta(minutes=6)
    assert decide(look(same_generation, secret, ca, just_after, generation=2)).action == ISSUE


def test_the_floor_warning_is_reported_once_per_change() -> None:
    conditions: list[dict[str, object]] = []
    reported = []
    for i, clamped in enumerate([True, True, True, False, False, True, True]):
        changed = floor_condition(conditions, clamped, "held", T0 + dt.timedelta(seconds=i))  # type: ignore[arg-type]
        if changed is not None:
            reported.append(changed["status"])
            conditions = [changed]
    assert reported == ["True", "False", "True"]
    assert floor_condition([], False, "", T0) is None  # never clamped: no condition at all


# --- the schedule follows the spec at once ------------------------------------------------------------------------


@pytest.mark.parametrize("new", [{"fraction": 0.3}, {"fraction": 0.9}, {"renew_before": dt.timedelta(minutes=50)},
                                 {"renew_before": dt.timedelta(minutes=5)}, {"fraction": 0.5, "on_schedule": True}])
def test_a_changed_renewal_point_moves_the_schedule_at_once(ca: CertificateAuthority, new: dict[str, object]) -> None:
    on_schedule = bool(new.pop("on_schedule", False))
    old = effective(dt.timedelta(hours=1), fraction=2 / 3)
    changed = effective(dt.timedelta(hours=1), **new)  # type: ignore[arg-type]
    moved = []
    for _ in range(5):  # five serials, five jitters: the recorded time cannot match the new schedule for all
        issuance = issue_for(old, ca, T0, on_schedule=on_schedule)
        secret = snapshot(old, issuance)
        d = decide(look(changed, secret, ca, T0 + dt.timedelta(seconds=1), generation=2))
        assert d.action == WAIT and d.recheck_at is not None
        want = renewal_time(issuance.issued_at, issuance.certificate.not_after, changed.renew_at_fraction,
                            changed.renew_before, seed=issuance.serial, on_schedule=on_schedule)
        assert abs(d.recheck_at - want) < dt.timedelta(seconds=1)
        moved.append(abs(want - issuance.renewal_time) > dt.timedelta(seconds=30))
        # an unchanged spec gives back exactly the time written at issuance (the jitter is the serial's)
        same = decide(look(old, secret, ca, T0 + dt.timedelta(seconds=1)))
        assert same.recheck_at is not None and abs(same.recheck_at - issuance.renewal_time) < dt.timedelta(seconds=1)
    assert any(moved)  # not the time the Secret recorded


# --- Secrets judged by content ------------------------------------------------------------------------------------


def status_of(identity: EffectiveIdentity, issuance: Issuance, previous: dict[str, object] | None = None) \
        -> dict[str, object]:
    return issued_status(identity, issuance, previous or {}, rotated=bool(previous), ca_fingerprint="x",
                         renew_request=None, now=issuance.issued_at)


def forged_with_copied_aki(ca: CertificateAuthority, genuine: x509.Certificate) -> tuple[bytes, bytes]:
    """A leaf with the genuine SPIFFE ID, issuer name and AKI, signed by a key that is not the CA's."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateBuilder().subject_name(genuine.subject).issuer_name(genuine.issuer) \
        .public_key(key.public_key()).serial_number(x509.random_serial_number()) \
        .not_valid_before(genuine.not_valid_before_utc).not_valid_after(genuine.not_valid_after_utc)
    for ext in genuine.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tampering_is_judged_by_content_never_by_copied_annotations(ca: CertificateAuthority) -> None:
    identity = effective()
    first = issue_for(identity, ca, T0)
    current = issue_for(identity, ca, T0 + dt.timedelta(minutes=40))
    status = status_of(identity, current, status_of(identity, first))
    secret = snapshot(identity, current)
    now = T0 + dt.timedelta(minutes=41)
    assert decide(look(identity, secret, ca, now, status=status)).action == WAIT  # the genuine one stays

    def swapped(crt: bytes, key: bytes) -> SecretSnapshot:  # content replaced, every annotation left as it was
        return dataclasses.replace(secret, data={**secret.data, "tls.crt": crt, "tls.key": key})

    neighbour = issue_for(effective(serviceAccountName="api"), ca, T0 + dt.timedelta(minutes=41))
    later = issue_for(identity, ca, T0 + dt.timedelta(minutes=41))  # ours, written just before a crash
    other_ca = generate_ca("cluster.local", T0 - dt.timedelta(days=1))
    foreign = issue_for(identity, other_ca, T0 + dt.timedelta(minutes=41))
    forged = forged_with_copied_aki(ca, load_certificates(current.certificate.cert_chain_pem)[0])
    cases = {
        "another identity's certificate of the same CA, with its key": (
            swapped(neighbour.certificate.cert_chain_pem, neighbour.certificate.key_pem), "SecretTampered"),
        "the previous certificate of this identity (a rollback)": (
            swapped(first.certificate.cert_chain_pem, first.certificate.key_pem), "SecretTampered"),
        "a certificate with the CA's name and key id, not its signature": (swapped(*forged), "SecretTampered"),
        "a certificate of another CA for the same SPIFFE ID": (
            swapped(foreign.certificate.cert_chain_pem, foreign.certificate.key_pem), "SecretTampered"),
        "a foreign CA appended to ca.crt": (dataclasses.replace(secret, data={
            **secret.data, "ca.crt": secret.data["ca.crt"] + other_ca.roots_pem}), "SecretTampered"),
        "ca.crt replaced by garbage": (dataclasses.replace(secret, data={**secret.data, "ca.crt": b"x"}),
                                       "SecretTampered"),
        "the key swapped": (swapped(current.certificate.cert_chain_pem, neighbour.certificate.key_pem),
                            "SecretInvalid"),
    }
    for name, (tampered, reason) in cases.items():
        d = decide(look(identity, tampered, ca, now, status=status))
        assert (d.action, d.reason) == (ISSUE, reason), name
    # a newer certificate of ours that the status has not caught up with is accepted (a crash between the writes)
    crashed = swapped(later.certificate.cert_chain_pem, later.certificate.key_pem)
    assert decide(look(identity, crashed, ca, now, status=status)).action == WAIT


def test_a_move_to_another_trust_domain_is_a_spec_change_not_tampering(ca: CertificateAuthority) -> None:
    """The certificate in the Secret was signed by the old trust domain's CA, which the new one does not trust: that
    is the change the user asked for (SpecChanged, Event Rotated), not a repair."""
    identity = effective()
    issuance = issue_for(identity, ca, T0)
    status = status_of(identity, issuance)
    other_ca = generate_ca("other.example", T0 - dt.timedelta(days=1))
    tdspec = parse_trust_domain({"metadata": {"name": "other.example"}, "spec": {}})
    for change in ({"trustDomain": "other.example"}, {"trustDomain": "other.example", "serviceAccountName": "api"}):
        moved = resolve_identity(parse_workload_identity(body(**change)), tdspec)
        d = decide(look(moved, snapshot(identity, issuance), other_ca, T0 + dt.timedelta(minutes=1), generation=2,
                        status=status))
        assert (d.action, d.reason) == (ISSUE, "SpecChanged"), change
    # a new secretName: the Secret under it is missing because the user moved it, not because someone deleted it
    renamed = resolve_identity(parse_workload_identity(body(secretName="web-tls")), parse_trust_domain(
        {"metadata": {"name": "cluster.local"}, "spec": {}}))
    d = decide(look(renamed, ABSENT, ca, T0 + dt.timedelta(seconds=1), generation=2, status=status))
    assert (d.action, d.reason) == (ISSUE, "SpecChanged") and "secretName" in d.message
    assert decide(look(identity, ABSENT, ca, T0 + dt.timedelta(seconds=1), status=status)).reason == "SecretMissing"


def test_the_secret_digest_sees_content_not_annotations(ca: CertificateAuthority) -> None:
    identity = effective()
    a, b = issue_for(identity, ca, T0), issue_for(identity, ca, T0)
    sa, sb = snapshot(identity, a), snapshot(identity, b)
    assert secret_digest(sa.data) == secret_digest(dict(sa.data))
    for key in ("tls.crt", "tls.key"):
        assert secret_digest({**sa.data, key: sb.data[key]}) != secret_digest(sa.data), key
    assert secret_digest({**sa.data, "ca.crt": sa.data["ca.crt"] + b"\n"}) != secret_digest(sa.data)
    assert secret_digest({k: v for k, v in sa.data.items() if k != "ca.crt"}) != secret_digest(sa.data)


# --- what a spec change leaves behind -----------------------------------------------------------------------------


CHANGES = [
    ({"serviceAccountName": "api"}, True, False),
    ({"trustDomain": "other.example"}, True, False),
    ({"secretName": "web-tls"}, True, True),
    ({"serviceAccountName": "api", "secretName": "web-tls"}, True, True),
    ({"ttl": "30m"}, False, False),
    ({"keyAlgorithm": "ed25519"}, False, False),
    ({"renewAtPercent": 30}, False, False),
]


@pytest.mark.parametrize(("change", "revokes", "moves"), CHANGES, ids=lambda v: str(v))
def test_a_spec_change_revokes_under_the_issuer_and_moves_the_secret(
        ca: CertificateAuthority, change: dict[str, object], revokes: bool, moves: bool) -> None:
    identity = effective()
    first = issue_for(identity, ca, T0)
    second = issue_for(identity, ca, T0 + dt.timedelta(minutes=40))
    status = status_of(identity, second, status_of(identity, first))
    td = str(change.get("trustDomain", "cluster.local"))
    tdspec = parse_trust_domain({"metadata": {"name": td}, "spec": {}})
    new = resolve_identity(parse_workload_identity(body(**change)), tdspec)
    result = superseded_by_spec(status, new, False, T0 + dt.timedelta(minutes=41))
    if not revokes:
        assert result is None
        return
    assert result is not None
    # every still-valid certificate under the old values, on the CRL of the trust domain that issued it
    assert result.serials == {"cluster.local": [(first.serial, first.certificate.not_after.replace(microsecond=0)),
                                                (second.serial, second.certificate.not_after.replace(microsecond=0))]}
    assert result.old_secret_name == ("web-mtls" if moves else None)
    # dnsNames changed alone: the old names must not stay valid either
    assert superseded_by_spec(status, identity, True, T0) is not None


def test_serials_are_revoked_on_the_crl_of_the_trust_domain_that_issued_them(ca: CertificateAuthority) -> None:
    a = issue_for(effective(), ca, T0)
    status: dict[str, object] = {
        "trustDomain": "b.example", "serialNumber": "cc", "notAfter": "2026-11-27T14:00:00Z",
        "activeSerials": [
            {"serial": "aa", "notAfter": "2026-11-27T13:00:00Z", "trustDomain": "a.example"},
            {"serial": "ab", "notAfter": "2026-11-27T11:00:00Z", "trustDomain": "a.example"},  # expired: left off
            {"serial": "bb", "notAfter": "2026-11-27T13:30:00Z"},  # written before entries named their issuer
            {"serial": a.serial, "notAfter": "2026-11-27T13:00:00Z", "trustDomain": "b.example"},
        ]}
    grouped = revocations_by_issuer(status, "fallback", T0)
    assert {td: sorted(s for s, _ in serials) for td, serials in grouped.items()} == {
        "a.example": ["aa"], "b.example": sorted(["bb", "cc", a.serial])}
    assert revocations_by_issuer({}, "fallback", T0) == {}
    assert issued_status(effective(), a, {}, False, "x", None, T0)["activeSerials"][0]["trustDomain"] == \
        "cluster.local"


# --- terminating namespaces ---------------------------------------------------------------------------------------


def test_a_terminating_namespace_is_recognised_and_nothing_else_is() -> None:
    message = ('secrets "web-mtls" is forbidden: unable to create new content in namespace shop because it is being '
               "terminated")
    assert namespace_terminating(403, f"403 Forbidden: {message}")
    assert not namespace_terminating(403, 'secrets is forbidden: User "x" cannot create resource "secrets"')
    for status in (404, 409, 422, 500):
        assert not namespace_terminating(status, message)


# --- sidecar configs too large to publish -------------------------------------------------------------------------


def long_peer(i: int, length: int) -> str:
    prefix = f"spiffe://cluster.local/ns/shop/sa/p{i}-"
    return prefix + "x" * (length - len(prefix))


@pytest.mark.parametrize(("peers", "peer_length", "inbound", "outbound"),
                         [(256, 2048, 2, 32), (256, 2048, 1, 32), (16, 2048, 8, 0), (512, 2048, 1, 0),
                          (1, 100, 1, 1), (256, 1024, 3, 0), (0, 0, 0, 200)])
def test_a_sidecar_config_over_the_configmap_limit_is_refused_with_its_fields(
        peers: int, peer_length: int, inbound: int, outbound: int) -> None:
    spec = {"allowedPeers": [long_peer(i, peer_length) for i in range(peers)],
            "inbound": [{"port": 8443 + i, "appPort": 9000 + i} for i in range(inbound)],
            "outbound": [{"listenPort": 16000 + i, "address": f"svc{i}.shop.svc:443",
                          "peer": long_peer(i, 2048)} for i in range(outbound)]}
    identity = effective(**spec)
    text = render_sidecar_config(identity).to_yaml()
    too_large = len(text.encode()) + len("proxy.yaml") > CONFIGMAP_DATA_LIMIT
    if not too_large:
        check_publishable(identity, text)
        return
    with pytest.raises(SpecError) as caught:
        check_publishable(identity, text)
    assert caught.value.reason == "SidecarConfigTooLarge"
    assert caught.value.field in ("spec.allowedPeers", "spec.inbound", "spec.outbound")
    assert str(CONFIGMAP_DATA_LIMIT) in str(caught.value)


def test_the_probe_sidecar_config_is_too_large() -> None:
    """256 allowedPeers of 2048 characters on two inbound routes and 32 outbound: over 1 MiB."""
    identity = effective(allowedPeers=[long_peer(i, 2048) for i in range(256)],
                         inbound=[{"port": 8443, "appPort": 8080}, {"port": 9443, "appPort": 9080}],
                         outbound=[{"listenPort": 16000 + i, "address": f"s{i}.shop.svc:443",
                                    "peer": long_peer(i, 2048)} for i in range(32)])
    with pytest.raises(SpecError, match="ConfigMap limit"):
        check_publishable(identity, render_sidecar_config(identity).to_yaml())


# --- identities that would put certificates on the same pods ------------------------------------------------------


SELECTORS: list[dict[str, str]] = [{}, {"app": "web"}, {"app": "api"}, {"app": "web", "tier": "front"},
                                   {"tier": "front"}, {"tier": "back"}]


def test_selectors_overlap_unless_they_want_different_values_for_a_label() -> None:
    for a, b in itertools.product(SELECTORS, repeat=2):
        # brute force over the pods these selectors can tell apart
        pods = [dict(p) for p in itertools.product(*[[(k, v) for v in ("web", "api", "front", "back", None)]
                                                     for k in ("app", "tier")])]
        pods = [{k: v for k, v in pod.items() if v is not None} for pod in pods]
        some_pod = any(all(pod.get(k) == v for k, v in {**a, **b}.items()) and
                       all(pod.get(k) == v for k, v in a.items()) and all(pod.get(k) == v for k, v in b.items())
                       for pod in pods)
        assert selectors_overlap(a, b) == some_pod == selectors_overlap(b, a), (a, b)


def test_the_overlap_index_names_each_other_and_says_who_must_report_again() -> None:
    index = PodSelectionIndex()
    assert index.put("shop", "a", "web", {}) == set()
    assert index.put("shop", "b", "web", {"app": "web"}) == {"a"}  # b overlaps a: a reports again
    assert index.overlapping("shop", "a") == ["b"] and index.overlapping("shop", "b") == ["a"]
    assert index.put("shop", "c", "api", {}) == set()  # another ServiceAccount
    assert index.put("other", "d", "web", {}) == set()  # another namespace
    assert index.put("shop", "e", "web", {"app": "api"}) == {"a"}  # overlaps a (empty), not b
    assert index.overlapping("shop", "a") == ["b", "e"] and index.overlapping("shop", "e") == ["a"]
    assert index.put("shop", "b", "api", {}) == {"a", "c"}  # moved to another ServiceAccount
    assert index.overlapping("shop", "a") == ["e"] and index.overlapping("shop", "c") == ["b"]
    assert index.remove("shop", "e") == {"a"}
    assert index.overlapping("shop", "a") == []
    assert index.remove("shop", "missing") == set()


def test_the_overlap_condition_is_written_once_per_change() -> None:
    first = overlap_condition([], "web", ["b"], T0)
    assert first is not None and first["status"] == "True" and "b" in first["message"]
    assert overlap_condition([first], "web", ["b"], T0) is None
    both = overlap_condition([first], "web", ["b", "c"], T0)
    assert both is not None and "b, c" in both["message"]
    cleared = overlap_condition([both], "web", [], T0)
    assert cleared is not None and cleared["status"] == "False"
    assert overlap_condition([cleared], "web", [], T0) is None
    assert overlap_condition([], "web", [], T0) is None


def test_managed_labels_are_what_the_watches_select() -> None:
    """The Secret and sidecar ConfigMap watches select by these labels on the server: meshtls writes them."""
    identity = effective(inbound=[{"port": 8443, "appPort": 8080}])
    labels = secret_body(identity, issue_for(identity, generate_ca("cluster.local", T0), T0), OWNER)["metadata"][
        "labels"]
    assert labels[LABEL_MANAGED_BY] == MANAGED_BY and labels["meshtls.dev/identity"] == "web"
