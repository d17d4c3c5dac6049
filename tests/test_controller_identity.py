"""The identity controller (handlers.reconcile) through its public functions, against the shared in-memory API
(testsupport.fakekube: resourceVersions, 409/404) and a fake clock: no cluster, no kopf.

Covers the conflict fallback of a first issuance, status catch-up after a crash between the Secret and the status,
renewal on the clock, revoke-on-delete (per issuer, only our Secret, finalizer released), CRL batching, the CRL
re-signed for age, and the CA rotation phases. The e2e suites check the same on a real control plane."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from testsupport.fakekube import FakeKube

from meshtls.api.constants import (
    ANNOTATION_DEFAULT_TRUST_DOMAIN,
    ANNOTATION_OWNER_UID,
    ANNOTATION_RENEW,
    ANNOTATION_REVOKE,
    ANNOTATION_ROTATE_CA,
    ANNOTATION_SERIAL,
    FINALIZER,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from meshtls.api.names import state_secret_name
from meshtls.api.objects import SecretSnapshot
from meshtls.api.reasons import Reason
from meshtls.controller.deletion import revoke_on_delete
from meshtls.controller.identity import on_identity_event, reconcile
from meshtls.controller.runtime import Operator
from meshtls.controller.scheduler import TrustDomainKey
from meshtls.controller.trust.registry import TrustDomains
from meshtls.controller.trust_domains import reconcile_trust_domain
from meshtls.kube.client import ApiError, Conflict, NotFound
from meshtls.pki import load_certificates, load_crls
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE
from meshtls.policy.clock import FakeClock

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
OPNS = "meshtls-system"
BUNDLE = "meshtls-bundle"
SECOND = dt.timedelta(seconds=1)


# --- the world: one fake API, one fake clock, one operator --------------------------------------------------------


def trust_domain(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "TrustDomain", "metadata": {"name": name, "annotations": {}},
            "spec": spec or {}}


def identity(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"serviceAccountName": name, **spec}}


def operator(kube: FakeKube, clock: FakeClock) -> Operator:
    """A fresh operator process over the same API (a restart: nothing in memory)."""
    return Operator(kube, clock, TrustDomains(kube, clock, OPNS))  # type: ignore[arg-type]


def world(*names: str, spec: dict[str, Any] | None = None) -> tuple[FakeKube, FakeClock, Operator]:
    kube, clock = FakeKube(), FakeClock(T0)
    for name in names or ("a.example",):
        kube.trust_domains[name] = trust_domain(name, spec)
    return kube, clock, operator(kube, clock)


async def create(op: Operator, kube: FakeKube, body: dict[str, Any]) -> dict[str, Any]:
    """kubectl apply, then the ADDED event the operator's watch gets."""
    kube.put_identity(body)
    meta = body["metadata"]
    await on_identity_event(op, "ADDED", stored(kube, meta["namespace"], meta["name"]))
    return stored(kube, meta["namespace"], meta["name"])


def stored(kube: FakeKube, namespace: str, name: str) -> dict[str, Any]:
    body = kube.get_workload_identity(namespace, name)
    assert body is not None
    return body


async def run_due(op: Operator) -> int:
    """What RenewalScheduler.run does at this instant: every key due now, earliest first. Returns how many ran.
    (Reads the scheduler's table directly: its own loop waits on the wall clock, these tests move a fake one.)"""
    ran = 0
    now = op.clock.now()
    for key, when in sorted(op.scheduler._due.items(), key=lambda item: item[1]):
        if when <= now and op.scheduler.due_at(key) == when:
            op.scheduler.forget(key)
            await op.reconcile_key(key)
            ran += 1
    return ran


async def run_until(op: Operator, clock: FakeClock, until: dt.datetime) -> None:
    """Move the clock forward to `until`, stopping at each due time on the way to run what is due."""
    while True:
        due = [when for when in op.scheduler._due.values() if when <= until]
        step = max(min(due), clock.now()) if due else until
        clock.advance(step - clock.now())
        if not due:
            return
        await run_due(op)


def serial_of(kube: FakeKube, namespace: str, secret: str) -> str:
    return format(load_certificates(kube.secrets[(namespace, secret)].data["tls.crt"])[0].serial_number, "x")


def leaf(kube: FakeKube, namespace: str, secret: str) -> x509.Certificate:
    return load_certificates(kube.secrets[(namespace, secret)].data["tls.crt"])[0]


def condition(body: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_)


def bundle_roots(kube: FakeKube, namespace: str) -> set[bytes]:
    data = kube.configmaps[(namespace, BUNDLE)]["data"]
    return {c.public_bytes(Encoding.DER) for c in load_certificates(data["ca.crt"].encode())}


def revoked_serials(kube: FakeKube, trust_domain_name: str) -> set[str]:
    state = kube.secrets[(OPNS, state_secret_name(trust_domain_name))]
    return {e["serial"] for e in json.loads(state.data["revocations.json"])["entries"]}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


SPECS = [{}, {"secretName": "custom-tls"}, {"ttl": "10m"}, {"ttl": "24h", "renewBefore": "2h"}]


# --- first issuance: created without a read; a Secret already there makes the create conflict ----------------------


@pytest.mark.parametrize("spec", SPECS)
def test_a_first_issuance_creates_the_secret_without_reading_it_first(spec: dict[str, Any]) -> None:
    kube, _clock, op = world()

    async def scenario() -> None:
        body = await create(op, kube, identity("web", **spec))
        secret = spec.get("secretName", "web-mtls")
        assert kube.count("read_secret", "shop", secret) == 0
        assert kube.count("write_secret") == 1
        assert kube.secrets[("shop", secret)].owned_by(body["metadata"]["uid"])
        assert body["metadata"]["finalizers"] == [FINALIZER]
        assert body["status"]["serialNumber"] == serial_of(kube, "shop", secret)
        ready = condition(body, "Ready")
        assert (ready["status"], ready["reason"]) == ("True", Reason.ISSUED)
        assert kube.reasons("web") == [Reason.ISSUED]

    run(scenario())


EARLIER_FAILURE = {"type": "Ready", "status": "False", "reason": "UnknownTrustDomain", "message": "an earlier failure"}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("status_left", [{}, {"conditions": [EARLIER_FAILURE]}])
def test_our_secret_from_before_a_crash_is_adopted_without_a_new_write(spec: dict[str, Any],
                                                                     status_left: dict[str, Any]) -> None:
    """The operator died between writing the Secret and the status: the next process's create conflicts, it reads
    and finds its own valid Secret, and records it (one Issued Event) instead of writing another."""
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web", **spec))
        secret = spec.get("secretName", "web-mtls")
        before = kube.secrets[("shop", secret)]
        kube.identities[("shop", "web")]["status"] = dict(status_left)  # the status write never happened
        kube.events.clear()
        kube.calls.clear()
        clock.advance(dt.timedelta(seconds=7))
        restarted = operator(kube, clock)
        await on_identity_event(restarted, "ADDED", stored(kube, "shop", "web"))
        assert kube.secrets[("shop", secret)] is before  # adopted: not replaced, not re-issued
        creates = kube.count("write_secret")
        assert creates == (1 if not status_left else 0)  # a never-reconciled identity tries the create first
        assert kube.count("read_secret", "shop", secret) == 1
        body = stored(kube, "shop", "web")
        assert body["status"]["serialNumber"] == serial_of(kube, "shop", secret)
        assert condition(body, "Ready")["reason"] == Reason.ISSUED
        assert kube.reasons("web") == [Reason.ISSUED]
        assert "recorded after an operator restart" in kube.events[0]["message"]

    run(scenario())


STRANGERS = {
    "unlabelled": ({}, {}, ()),
    "another identity's (ownerReference)": ({LABEL_MANAGED_BY: MANAGED_BY}, {}, ("someone-else",)),
    "another identity's (owner-uid annotation)": ({LABEL_MANAGED_BY: MANAGED_BY},
                                                  {ANNOTATION_OWNER_UID: "someone-else"}, ()),
    "ours by uid but not labelled": ({}, {}, ("OURS",)),
}


@pytest.mark.parametrize("stranger", sorted(STRANGERS))
@pytest.mark.parametrize("data", [{}, {"tls.crt": b"not a certificate", "tls.key": b"x"}])
def test_a_strangers_secret_gives_secret_conflict_and_is_never_written(stranger: str,
                                                                       data: dict[str, bytes]) -> None:
    kube, clock, op = world()
    labels, annotations, owners = STRANGERS[stranger]

    async def scenario() -> None:
        body = identity("web")
        body["metadata"]["uid"] = "OURS"
        theirs = kube.put_secret("shop", "web-mtls", data, labels, annotations, owners)
        await create(op, kube, body)
        assert kube.secrets[("shop", "web-mtls")] is theirs
        assert kube.count("write_secret") == 1  # the create, which conflicted; nothing replaced theirs
        assert kube.count("read_secret", "shop", "web-mtls") == 1  # the conflict fallback: read, decide again
        ready = condition(stored(kube, "shop", "web"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", Reason.SECRET_CONFLICT)
        assert kube.reasons("web") == [Reason.SECRET_CONFLICT]
        assert [e["type"] for e in kube.events] == ["Warning"]
        # the retry looks again, finds the same, and says nothing new (no write, no Event)
        writes = len(kube.writes())
        for _ in range(3):
            await run_until(op, clock, clock.now() + dt.timedelta(seconds=31))
        assert kube.secrets[("shop", "web-mtls")] is theirs
        assert kube.count("write_secret") == 1
        assert len(kube.writes()) == writes
        # the stranger removes it: the next look issues ours
        del kube.secrets[("shop", "web-mtls")]
        await run_until(op, clock, clock.now() + dt.timedelta(seconds=31))
        assert kube.secrets[("shop", "web-mtls")].owned_by("OURS")
        assert condition(stored(kube, "shop", "web"), "Ready")["status"] == "True"

    run(scenario())


# --- status catch-up: the Secret one serial ahead of the status ----------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_a_secret_one_serial_ahead_of_the_status_is_recorded_once(spec: dict[str, Any]) -> None:
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web", **spec))
        secret = spec.get("secretName", "web-mtls")
        behind = dict(stored(kube, "shop", "web")["status"])
        due = op.scheduler.due_at(("shop", "web"))
        assert due is not None
        await run_until(op, clock, due)
        ahead = serial_of(kube, "shop", secret)
        assert ahead != behind["serialNumber"]
        kube.identities[("shop", "web")]["status"] = behind  # the operator died before the status write
        kube.events.clear()
        restarted = operator(kube, clock)
        await on_identity_event(restarted, "ADDED", stored(kube, "shop", "web"))
        for _ in range(3):  # further looks (a resync, a repeated event) say nothing new
            await reconcile(restarted, "shop", "web")
        status = stored(kube, "shop", "web")["status"]
        assert status["serialNumber"] == ahead
        assert {e["serial"] for e in status["activeSerials"]} >= {behind["serialNumber"], ahead}
        assert kube.reasons("web") == [Reason.ROTATED]
        assert f"{behind['serialNumber']} -> {ahead}" in kube.events[0]["message"]
        assert serial_of(kube, "shop", secret) == ahead  # nothing re-issued

    run(scenario())


# --- renewal on the clock --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_renewal_happens_at_the_renewal_time_and_not_before(spec: dict[str, Any]) -> None:
    kube, clock, op = world()
    key = ("shop", "web")

    async def scenario() -> None:
        await create(op, kube, identity("web", **spec))
        secret = spec.get("secretName", "web-mtls")
        for _round in range(3):
            status = stored(kube, *key)["status"]
            due = op.scheduler.due_at(key)
            assert due is not None
            assert abs(due - dt.datetime.fromisoformat(status["renewalTime"].replace("Z", "+00:00"))) < SECOND
            serial = serial_of(kube, "shop", secret)
            clock.advance(due - SECOND - clock.now())
            await reconcile(op, *key)  # an early look (an event, a resync) renews nothing
            assert await run_due(op) == 0
            assert serial_of(kube, "shop", secret) == serial
            clock.advance(SECOND)
            assert await run_due(op) == 1
            assert serial_of(kube, "shop", secret) != serial
            assert leaf(kube, "shop", secret).not_valid_before_utc <= clock.now()
            assert stored(kube, *key)["status"]["serialNumber"] == serial_of(kube, "shop", secret)
        assert kube.reasons("web") == [Reason.ISSUED] + [Reason.ROTATED] * 3

    run(scenario())


# --- revoke on delete ---------------------------------------------------------------------------------------------


def test_deletion_revokes_every_active_serial_on_its_issuers_crl_after_a_move() -> None:
    """An identity moved from a to b while a could not write its CRL: at deletion a's serial goes on a's CRL and
    b's on b's, each published where that trust domain is trusted."""
    kube, clock, op = world("a.example", "b.example")

    async def scenario() -> None:
        await create(op, kube, identity("web", trustDomain="a.example"))
        await create(op, kube, identity("api", trustDomain="a.example"))  # keeps a trusted in shop
        old = serial_of(kube, "shop", "web-mtls")
        await op.trust.get("b.example")
        clock.advance(dt.timedelta(minutes=1))
        body = stored(kube, "shop", "web")
        body["spec"]["trustDomain"] = "b.example"
        body["metadata"]["generation"] = 2
        kube.identities[("shop", "web")] = body
        kube.failures["write_opaque_secret"] = [ApiError(500, "InternalError", "etcd is slow")]
        await on_identity_event(op, "MODIFIED", stored(kube, "shop", "web"))
        new = serial_of(kube, "shop", "web-mtls")
        status = stored(kube, "shop", "web")["status"]
        assert {(e["serial"], e["trustDomain"]) for e in status["activeSerials"]} == {(old, "a.example"),
                                                                                    (new, "b.example")}
        superseded = [e for e in kube.events if e["reason"] == "Superseded"]
        assert len(superseded) == 1 and "kept for deletion" in superseded[0]["message"]
        assert kube.reasons("web") == [Reason.ISSUED, "Superseded", Reason.ROTATED]
        kube.events.clear()
        clock.advance(dt.timedelta(minutes=1))
        await on_identity_event(op, "MODIFIED", kube.delete_identity("shop", "web") or {})
        assert old in revoked_serials(kube, "a.example")
        assert new in revoked_serials(kube, "b.example")
        assert old not in revoked_serials(kube, "b.example") and new not in revoked_serials(kube, "a.example")
        a, b = op.trust.runtime("a.example"), op.trust.runtime("b.example")
        assert a is not None and b is not None
        crls = load_crls(kube.configmaps[("shop", BUNDLE)]["data"]["crl.pem"].encode())
        a_crl = next(c for c in crls if c.issuer == a.ca.certificate.subject)
        assert a_crl.get_revoked_certificate_by_serial_number(int(old, 16)) is not None
        assert ("shop", "web-mtls") not in kube.secrets
        assert ("shop", "web") not in kube.identities  # finalizer released: the API deleted it
        assert kube.reasons("web") == [Reason.REVOKED]
        assert old in kube.events[0]["message"] and new in kube.events[0]["message"]

    run(scenario())


@pytest.mark.parametrize("ours", [True, False])
def test_deletion_deletes_the_secret_only_if_ours(ours: bool) -> None:
    kube, _clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        serial = serial_of(kube, "shop", "web-mtls")
        if not ours:  # someone replaced it under the same name
            kube.put_secret("shop", "web-mtls", {"tls.crt": b"theirs"}, {"team": "x"})
        kept = kube.secrets[("shop", "web-mtls")]
        await on_identity_event(op, "MODIFIED", kube.delete_identity("shop", "web") or {})
        assert serial in revoked_serials(kube, "a.example")  # the status knew it either way
        assert (("shop", "web-mtls") in kube.secrets) is not ours
        if not ours:
            assert kube.secrets[("shop", "web-mtls")] is kept
            assert kube.count("delete_secret") == 0
        assert ("shop", "web") not in kube.identities
        assert kube.reasons("web") == [Reason.ISSUED, Reason.REVOKED]
        assert ("deleted" if ours else "left (not ours)") in kube.events[-1]["message"]

    run(scenario())


@pytest.mark.parametrize("when", ["before the operator saw it", "after it was loaded"])
def test_a_deleted_trust_domain_releases_the_finalizer_at_once_with_a_warning(when: str) -> None:
    kube, _clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        del kube.trust_domains["a.example"]
        deleter = operator(kube, _clock) if when == "before the operator saw it" else op
        await on_identity_event(deleter, "MODIFIED", kube.delete_identity("shop", "web") or {})
        assert ("shop", "web") not in kube.identities
        assert kube.reasons("web", "Warning") == ["TrustDomainGone"]
        assert ("shop", "web-mtls") not in kube.secrets  # ours: deleted all the same
        assert not deleter.background  # no retry pending

    run(scenario())


def test_revoke_on_delete_twice_is_harmless() -> None:
    """kopf may deliver the deletion again (a restart mid-way): the second pass revokes the same serial again,
    changes no CRL entry, and finds no Secret to delete."""
    kube, _clock, op = world()

    async def scenario() -> None:
        body = await create(op, kube, identity("web"))
        serial = serial_of(kube, "shop", "web-mtls")
        await revoke_on_delete(op, body)
        await revoke_on_delete(operator(kube, _clock), body)
        assert revoked_serials(kube, "a.example") == {serial}
        assert kube.count("delete_secret") == 1
        assert kube.reasons("web") == [Reason.ISSUED, Reason.REVOKED, Reason.REVOKED]

    run(scenario())


# --- CRL batching -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 5, 12])
def test_a_burst_of_deletions_costs_one_state_write_and_one_bundle_write_per_namespace(count: int) -> None:
    kube, _clock, op = world()
    namespaces = ["shop", "other"]

    async def scenario() -> None:
        serials = set()
        for i in range(count):
            ns = namespaces[i % 2]
            await create(op, kube, identity(f"id{i}", ns))
            serials.add(serial_of(kube, ns, f"id{i}-mtls"))
        kube.calls.clear()
        deleted = [kube.delete_identity(namespaces[i % 2], f"id{i}") or {} for i in range(count)]

        async def deletion(i: int, body: dict[str, Any]) -> None:
            await asyncio.sleep(i * 0.004)  # a burst, not one instant: each arrives inside the first one's window
            await on_identity_event(op, "MODIFIED", body)

        await asyncio.gather(*(deletion(i, body) for i, body in enumerate(deleted)))
        assert revoked_serials(kube, "a.example") == serials
        assert kube.count("write_opaque_secret", OPNS, state_secret_name("a.example")) == 1
        for ns in namespaces:
            assert kube.count("update_owned_configmap", ns, BUNDLE) == 1  # one write per namespace,
            assert kube.count("write_configmap", ns, BUNDLE) == kube.count("read_configmap", ns, BUNDLE) == 0  # no read
            crl = load_crls(kube.configmaps[(ns, BUNDLE)]["data"]["crl.pem"].encode())[0]
            assert {format(r.serial_number, "x") for r in crl} == serials  # every namespace sees every revocation
        assert not kube.identities

    run(scenario())


# --- the CRL re-signed for age -------------------------------------------------------------------------------------


@pytest.mark.parametrize("validity", ["5m", "1h", "24h", "240h"])
def test_the_crl_is_resigned_at_half_its_validity_with_a_new_number(validity: str) -> None:
    kube, clock, _ = world(spec={"crl": {"validity": validity}})
    # a resync longer than any validity: only the CRL's own age brings the trust domain's timer round
    op = Operator(kube, clock, TrustDomains(kube, clock, OPNS, resync=dt.timedelta(days=30)))  # type: ignore[arg-type]
    key = TrustDomainKey("a.example")

    async def scenario() -> None:
        await reconcile_trust_domain(op, kube.trust_domains["a.example"])
        await create(op, kube, identity("web", ttl="24h"))
        runtime = op.trust.runtime("a.example")
        assert runtime is not None
        lifetime = runtime.spec.crl_validity
        signed_at = clock.now()
        for _round in range(3):
            crl = load_crls(kube.configmaps[("shop", BUNDLE)]["data"]["crl.pem"].encode())[0]
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            resign = signed_at + lifetime / 2
            await run_until(op, clock, resign - SECOND)
            assert op.scheduler.due_at(key) == resign
            await reconcile_trust_domain(op, kube.trust_domains["a.example"])  # an early look re-signs nothing
            same = load_crls(kube.configmaps[("shop", BUNDLE)]["data"]["crl.pem"].encode())[0]
            assert same.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number
            assert op.scheduler.due_at(key) is not None
            await run_until(op, clock, resign)
            fresh = load_crls(kube.configmaps[("shop", BUNDLE)]["data"]["crl.pem"].encode())[0]
            assert fresh.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
            assert fresh.next_update_utc is not None and fresh.next_update_utc >= clock.now() + lifetime - SECOND
            assert kube.reasons("a.example", "Warning") == []
            signed_at = clock.now()

    run(scenario())


# --- CA rotation phases -------------------------------------------------------------------------------------------


def test_ca_rotation_moves_preparing_rotating_stable_on_the_clock() -> None:
    spec = {"ca": {"propagationDelay": "60s"}, "certificates": {"maxTTL": "1h", "defaultTTL": "1h"}}
    kube, clock, op = world(spec=spec)

    def phase() -> str:
        return str(kube.trust_domains["a.example"]["status"]["rotation"]["phase"])

    async def scenario() -> None:
        await reconcile_trust_domain(op, kube.trust_domains["a.example"])
        assert kube.reasons("a.example") == ["CAReady"]
        for ns, name in (("shop", "web"), ("other", "api")):
            await create(op, kube, identity(name, ns))
        runtime = op.trust.runtime("a.example")
        assert runtime is not None
        old = runtime.ca
        old_roots = {r.public_bytes(Encoding.DER) for r in old.roots}
        kube.trust_domains["a.example"]["metadata"]["annotations"][ANNOTATION_ROTATE_CA] = "request-1"
        started = clock.now()
        await reconcile_trust_domain(op, kube.get_trust_domain("a.example") or {})
        assert phase() == PREPARING
        assert kube.reasons("a.example")[-1] == "CARotationStarted"
        runtime = op.trust.runtime("a.example")
        assert runtime is not None and runtime.next_ca is not None
        new = runtime.next_ca
        new_roots = {r.public_bytes(Encoding.DER) for r in new.roots}
        for ns in ("shop", "other"):
            assert bundle_roots(kube, ns) == old_roots | new_roots  # both trusted before the new one signs
        # not a step before propagationDelay: identities still from the old CA
        await run_until(op, clock, started + dt.timedelta(seconds=59))
        assert phase() == PREPARING
        assert leaf(kube, "shop", "web-mtls").issuer == old.certificate.subject
        await run_until(op, clock, started + dt.timedelta(seconds=60))
        assert phase() == ROTATING
        assert kube.reasons("a.example")[-1] == "CARotated"
        for ns in ("shop", "other"):
            assert bundle_roots(kube, ns) == old_roots | new_roots  # the old one stays for its live leaves
        # every identity re-issues from the new CA within the spread (min(defaultTTL/4, 5m))
        await run_until(op, clock, clock.now() + dt.timedelta(minutes=5))
        for ns, name in (("shop", "web"), ("other", "api")):
            cert = leaf(kube, ns, f"{name}-mtls")
            assert cert.issuer == new.certificate.subject
            cert.verify_directly_issued_by(new.certificate)
            assert kube.reasons(name)[-1] == Reason.ROTATED
        assert phase() == ROTATING
        retire = dt.datetime.fromisoformat(
            kube.trust_domains["a.example"]["status"]["rotation"]["retireAfter"].replace("Z", "+00:00"))
        await run_until(op, clock, retire - SECOND)
        assert phase() == ROTATING
        await run_until(op, clock, retire + dt.timedelta(seconds=31))  # the next look after retireAfter
        assert phase() == STABLE
        assert kube.reasons("a.example") == ["CAReady", "CARotationStarted", "CARotated", "CARetired"]
        for ns in ("shop", "other"):
            assert bundle_roots(kube, ns) == new_roots
        assert condition(kube.trust_domains["a.example"], "Ready")["reason"] == "CAReady"
        assert kube.reasons(type_="Warning") == []

    run(scenario())


def test_unchanged_identities_cost_no_writes_on_later_looks() -> None:
    """Our own status and finalizer writes come back as events; a resync repeats the last one: none writes."""
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        writes = len(kube.writes())
        for _ in range(3):
            clock.advance(dt.timedelta(seconds=30))
            await on_identity_event(op, "MODIFIED", stored(kube, "shop", "web"))
            await reconcile(op, "shop", "web")
        assert len(kube.writes()) == writes

    run(scenario())


def test_a_secret_snapshot_from_the_fake_is_a_real_secret_snapshot() -> None:
    """The fake hands out the production type, so `owned_by` and `managed` are the real decisions."""
    kube = FakeKube()
    snap = kube.put_secret("ns", "s", {"k": b"v"}, {LABEL_MANAGED_BY: MANAGED_BY}, {ANNOTATION_OWNER_UID: "u"})
    assert isinstance(snap, SecretSnapshot) and snap.owned_by("u") and not snap.owned_by("v")


# --- requests and expected conditions users see ------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["keyCompromise", "superseded", "not-a-reason"])
def test_a_revoke_request_revokes_the_current_serial_reissues_and_clears_the_annotation(reason: str) -> None:
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        old = serial_of(kube, "shop", "web-mtls")
        clock.advance(dt.timedelta(seconds=5))
        kube.patch_workload_identity_annotations("shop", "web", {ANNOTATION_REVOKE: reason})
        await on_identity_event(op, "MODIFIED", stored(kube, "shop", "web"))
        assert old in revoked_serials(kube, "a.example")
        assert serial_of(kube, "shop", "web-mtls") != old
        assert ANNOTATION_REVOKE not in stored(kube, "shop", "web")["metadata"].get("annotations", {})
        assert kube.reasons("web") == [Reason.ISSUED, Reason.ROTATED]
        crl = load_crls(kube.configmaps[("shop", BUNDLE)]["data"]["crl.pem"].encode())[0]
        assert crl.get_revoked_certificate_by_serial_number(int(old, 16)) is not None

    run(scenario())


def test_a_renew_request_is_served_once_per_request_id() -> None:
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        serials = [serial_of(kube, "shop", "web-mtls")]
        for request in ("r1", "r1", "r2"):
            clock.advance(dt.timedelta(minutes=2))  # past the re-issue floor
            kube.patch_workload_identity_annotations("shop", "web", {ANNOTATION_RENEW: request})
            await on_identity_event(op, "MODIFIED", stored(kube, "shop", "web"))
            await reconcile(op, "shop", "web")
            serials.append(serial_of(kube, "shop", "web-mtls"))
        assert serials[1] != serials[0] and serials[2] == serials[1] and serials[3] != serials[2]
        assert stored(kube, "shop", "web")["status"]["lastRenewRequest"] == "r2"
        assert kube.reasons("web") == [Reason.ISSUED, Reason.ROTATED, Reason.ROTATED]

    run(scenario())


@pytest.mark.parametrize("named", [None, "missing.example"])
def test_an_identity_without_a_usable_trust_domain_is_reported_once_and_issued_when_it_appears(
        named: str | None) -> None:
    kube, clock, op = world("other.example", "third.example")  # two, none default: no choice without a name
    spec = {"trustDomain": named} if named else {}

    async def scenario() -> None:
        await create(op, kube, identity("web", **spec))
        ready = condition(stored(kube, "shop", "web"), "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "UnknownTrustDomain")
        assert (named or "other.example, third.example") in ready["message"]
        assert kube.reasons("web", "Warning") == ["UnknownTrustDomain"]
        for _ in range(3):  # the retries find the same: no write, no Event
            await run_until(op, clock, clock.now() + dt.timedelta(seconds=61))
        assert len(kube.reasons("web")) == 1
        assert ("shop", "web-mtls") not in kube.secrets
        kube.trust_domains[named or "other.example"] = trust_domain(named or "other.example")
        if not named:
            kube.trust_domains["other.example"]["metadata"]["annotations"][ANNOTATION_DEFAULT_TRUST_DOMAIN] = "true"
        await run_until(op, clock, clock.now() + dt.timedelta(seconds=61))
        assert condition(stored(kube, "shop", "web"), "Ready")["reason"] == Reason.ISSUED
        assert kube.reasons("web")[-1] == Reason.ISSUED

    run(scenario())


def test_a_squatted_state_secret_makes_the_trust_domain_unusable_once() -> None:
    kube, clock, op = world()
    theirs = kube.put_secret(OPNS, state_secret_name("a.example"), {"ca.crt": b"mine"}, {"team": "x"})

    async def scenario() -> None:
        for _ in range(3):
            await reconcile_trust_domain(op, kube.get_trust_domain("a.example") or {})
            clock.advance(dt.timedelta(seconds=60))
        status = kube.trust_domains["a.example"]["status"]
        assert condition({"status": status}, "Ready")["reason"] == "StateSecretConflict"
        assert condition({"status": status}, "Issuing")["status"] == "False"
        assert kube.reasons("a.example") == ["StateSecretConflict"]
        assert kube.count("patch_trust_domain_status") == 1
        assert kube.secrets[(OPNS, state_secret_name("a.example"))] is theirs
        await create(op, kube, identity("web", trustDomain="a.example"))
        assert condition(stored(kube, "shop", "web"), "Ready")["reason"] == "StateSecretConflict"
        assert ("shop", "web-mtls") not in kube.secrets

    run(scenario())


# --- a defect found here: an event's body older than the reconcile that just ran ----------------------------------


@pytest.mark.parametrize("edit", ["annotation", "generation", "both"])
def test_an_event_racing_a_renewal_does_not_repeat_its_event_or_write_a_stale_status(edit: str) -> None:
    """The renewal timer and a user's edit at the same moment: the edit's event body was read before the renewal
    recorded its new serial. Catching up from that body posted a second Rotated Event "recorded after an operator
    restart" (there was none) and wrote the status from the stale copy."""
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        due = op.scheduler.due_at(("shop", "web"))
        assert due is not None
        clock.advance(due - clock.now())
        live = kube.identities[("shop", "web")]["metadata"]
        if edit in ("annotation", "both"):
            live["annotations"] = {"team": "payments"}
        if edit in ("generation", "both"):
            live["generation"] = 2
        event_body = stored(kube, "shop", "web")  # what the watch delivers, read before the renewal writes
        await asyncio.gather(run_due(op), on_identity_event(op, "MODIFIED", event_body))
        assert kube.reasons("web") == [Reason.ISSUED, Reason.ROTATED]
        assert not any("operator restart" in e["message"] for e in kube.events)
        status = stored(kube, "shop", "web")["status"]
        assert status["serialNumber"] == serial_of(kube, "shop", "web-mtls")
        assert kube.count("patch_workload_identity_status", "shop", "web") == 2  # issued, rotated: no third

    run(scenario())


# --- write failures on the way ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("conflicts", [1, 2, 3])
def test_a_renewal_whose_write_conflicts_tells_nobody_and_retries_a_second_later(conflicts: int) -> None:
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        serial = serial_of(kube, "shop", "web-mtls")
        due = op.scheduler.due_at(("shop", "web"))
        assert due is not None
        kube.failures["write_secret"] = [Conflict("the object has been modified") for _ in range(conflicts)]
        clock.advance(due - clock.now())
        for attempt in range(conflicts):
            assert await run_due(op) == 1
            assert serial_of(kube, "shop", "web-mtls") == serial
            assert kube.reasons("web") == [Reason.ISSUED]  # nothing happened: no Event, no status
            assert stored(kube, "shop", "web")["status"]["serialNumber"] == serial
            assert op.scheduler.due_at(("shop", "web")) == clock.now() + SECOND, attempt
            clock.advance(SECOND)
        assert await run_due(op) == 1
        assert serial_of(kube, "shop", "web-mtls") != serial
        assert kube.reasons("web") == [Reason.ISSUED, Reason.ROTATED]

    run(scenario())


def test_a_deletion_in_a_terminating_namespace_releases_the_finalizer_without_retrying() -> None:
    kube, _clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        await create(op, kube, identity("api", "other"))
        serial = serial_of(kube, "shop", "web-mtls")
        kube.terminating.add("shop")
        await on_identity_event(op, "MODIFIED", kube.delete_identity("shop", "web") or {})
        assert ("shop", "web") not in kube.identities
        assert not op.background
        assert serial in revoked_serials(kube, "a.example")  # still published where it matters
        crl = load_crls(kube.configmaps[("other", BUNDLE)]["data"]["crl.pem"].encode())[0]
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    run(scenario())


@pytest.mark.parametrize("request_annotation", [ANNOTATION_REVOKE, ANNOTATION_RENEW])
@pytest.mark.parametrize("timing", ["waiting on the lock", "after it finished"])
def test_a_request_is_served_once_when_its_event_arrives_after_another_reconcile_served_it(
        request_annotation: str, timing: str) -> None:
    """A user asks to revoke (or renew); a timer of the same identity (a retry, an overlap re-check) reconciles
    first and serves the request. The request's own event, read before that, must not serve it again: a second
    revocation would revoke the replacement certificate too."""
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        clock.advance(dt.timedelta(minutes=10))
        kube.patch_workload_identity_annotations("shop", "web", {request_annotation: "keyCompromise"})
        event_body = stored(kube, "shop", "web")
        op.scheduler.schedule(("shop", "web"), clock.now())
        if timing == "waiting on the lock":
            await asyncio.gather(run_due(op), on_identity_event(op, "MODIFIED", event_body))
        else:
            await run_due(op)
            await on_identity_event(op, "MODIFIED", event_body)
        assert kube.reasons("web") == [Reason.ISSUED, Reason.ROTATED]
        assert kube.count("write_secret") == 2
        current = serial_of(kube, "shop", "web-mtls")
        if request_annotation == ANNOTATION_REVOKE:
            assert len(revoked_serials(kube, "a.example")) == 1
            assert current not in revoked_serials(kube, "a.example")  # the replacement stays valid

    run(scenario())


def test_a_deletion_racing_a_renewal_revokes_both_serials() -> None:
    """The deletion's event copy was read before the renewal recorded its new serial: the Secret's own certificate
    goes on the CRL too, so nothing the identity ever held stays valid."""
    kube, clock, op = world()

    async def scenario() -> None:
        await create(op, kube, identity("web"))
        old = serial_of(kube, "shop", "web-mtls")
        due = op.scheduler.due_at(("shop", "web"))
        assert due is not None
        clock.advance(due - clock.now())
        deleted: list[dict[str, Any]] = []
        read = kube.get_workload_identity

        def read_then_delete(namespace: str, name: str) -> dict[str, Any] | None:
            body = read(namespace, name)  # the renewal's read, just before a user deletes the identity
            deleted.append(kube.delete_identity(namespace, name) or {})
            kube.get_workload_identity = read  # type: ignore[method-assign]
            return body

        kube.get_workload_identity = read_then_delete  # type: ignore[method-assign]
        renewal = asyncio.ensure_future(run_due(op))
        while not deleted:
            await asyncio.sleep(0)
        await on_identity_event(op, "MODIFIED", deleted[0])  # waits on the lock the renewal holds
        assert await renewal == 1
        assert kube.count("write_secret") == 2
        written = [args[0] for name, args in kube.calls if name == "write_secret"]
        new = written[-1]["metadata"]["annotations"][ANNOTATION_SERIAL]
        assert new != old and revoked_serials(kube, "a.example") >= {old, new}
        assert ("shop", "web-mtls") not in kube.secrets and ("shop", "web") not in kube.identities

    run(scenario())


@pytest.mark.parametrize("failing", ["patch_workload_identity_status", "write_secret"])
def test_an_identity_whose_namespace_is_gone_is_let_go_without_a_retry_loop(failing: str) -> None:
    """An identity can outlive its namespace in the API (a namespace removed around its objects): its reads work,
    every write answers 404. It must not be retried every few seconds forever."""
    kube, clock, op = world()
    body = identity("web") if failing == "write_secret" else identity("web", trustDomain="gone.example")

    async def scenario() -> None:
        kube.failures[failing] = [NotFound("namespaces \"shop\" not found") for _ in range(3)]
        await create(op, kube, body)
        assert op.scheduler.due_at(("shop", "web")) is None  # let go: nothing scheduled
        clock.advance(dt.timedelta(minutes=5))
        assert await run_due(op) == 0
        assert kube.count(failing) == 1  # one attempt, no loop

    run(scenario())
