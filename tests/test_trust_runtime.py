"""TrustDomains against the shared in-memory API (testsupport.fakekube, 404/409 semantics) (issue #13): the CA is
persisted before it signs, never minted anew under live certificates, federation degrades without stopping issuance,
bundles are merged per namespace and ConfigMap name, squatted names are reported, renamed bundles are cleaned up."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from testsupport.fakekube import FakeKube

from meshtls.api.constants import ANNOTATION_TRUST_DOMAINS, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.names import state_secret_name
from meshtls.api.objects import SecretSnapshot
from meshtls.controller.trust.domain import TrustDomainError
from meshtls.controller.trust.registry import TrustDomains
from meshtls.kube.client import ApiError, Conflict
from meshtls.pki import (
    RevocationReason,
    RevokedCertificate,
    certificates_pem,
    generate_ca,
    load_certificates,
    load_crls,
)
from meshtls.policy.clock import FakeClock

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
OPNS = "meshtls-system"


def td(name: str, spec: dict[str, Any] | None = None, default: bool = False) -> dict[str, Any]:
    annotations = {"meshtls.dev/default-trust-domain": "true"} if default else {}
    return {"apiVersion": "meshtls.dev/v1alpha1", "kind": "TrustDomain",
            "metadata": {"name": name, "annotations": annotations}, "spec": spec or {}}


def make(kube: FakeKube) -> TrustDomains:
    return TrustDomains(kube, FakeClock(T0), OPNS)  # type: ignore[arg-type]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- item 3: no certificate from a CA that is not persisted first ------------------------------------------------


@pytest.mark.parametrize("federation", [None, "configMapRef", "secretRef"])
def test_the_ca_is_saved_before_any_identity_can_use_it(federation: str | None) -> None:
    kube = FakeKube()
    spec = {"federatesWith": [{"trustDomain": "peer.example", federation: {"name": "nope", "namespace": "nowhere"}}]
            } if federation else {}
    kube.trust_domains["a.example"] = td("a.example", spec)
    trust = make(kube)

    async def scenario() -> None:
        runtime = await trust.get("a.example", ("ns", "id"))
        state = kube.secrets[(OPNS, state_secret_name("a.example"))]
        assert state.data["ca.crt"] == runtime.ca.certificate_pem()  # persisted, and it is the one that signs
        if federation:  # federation degrades; local issuance goes on; the TrustDomain says so
            assert runtime.federation_problem and runtime.federation_problem[0] == "FederationBundleMissing"
            status = trust.status_of(runtime)
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            assert ready["status"] == "False" and ready["reason"] == "FederationBundleMissing"
            assert any(c["type"] == "Issuing" and c["status"] == "True" for c in status["conditions"])
            assert any(c["type"] == "Federated" and c["status"] == "False" for c in status["conditions"])
        # every later look (the 10 s loop of old) keeps the same CA
        for _ in range(5):
            again, _changes = await trust.ensure(kube.trust_domains["a.example"])
            assert again.ca.fingerprint == runtime.ca.fingerprint
        # a restart (a new process) loads the very same CA
        restarted = make(kube)
        assert (await restarted.get("a.example")).ca.fingerprint == runtime.ca.fingerprint

    run(scenario())


def test_a_failed_save_leaves_no_usable_ca() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    def refuse(*_: Any, **__: Any) -> None:
        raise Conflict("someone else created it")

    kube.write_opaque_secret = refuse  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        run(trust.get("a.example"))
    assert trust.runtime("a.example") is None  # nothing can sign with the unsaved key


def test_a_deleted_state_secret_is_restored_from_memory_never_a_new_ca() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        runtime = await trust.get("a.example")
        for _ in range(3):
            del kube.secrets[(OPNS, state_secret_name("a.example"))]
            again, changes = await trust.ensure(kube.trust_domains["a.example"])
            assert again.ca.fingerprint == runtime.ca.fingerprint
            assert [reason for reason, _ in changes] == ["CAStateRestored"]
            assert kube.secrets[(OPNS, state_secret_name("a.example"))].data["ca.crt"] == runtime.ca.certificate_pem()

    run(scenario())


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_brought_ca_that_goes_away_stops_issuance_at_once(how: str) -> None:
    kube = FakeKube()
    ca = generate_ca("a.example", T0)
    kube.secrets[(OPNS, "brought")] = SecretSnapshot(True, "brought", {"tls.crt": certificates_pem([ca.certificate]),
                                                                       "tls.key": ca.key_pem()})
    kube.trust_domains["a.example"] = td("a.example", {"ca": {"secretRef": {"name": "brought"}}})
    trust = make(kube)

    async def scenario() -> None:
        assert (await trust.get("a.example")).ca.fingerprint == ca.fingerprint
        if how == "deleted":
            del kube.secrets[(OPNS, "brought")]
        else:
            kube.secrets[(OPNS, "brought")] = SecretSnapshot(True, "brought", {})
        with pytest.raises(TrustDomainError) as failed:
            await trust.ensure(kube.trust_domains["a.example"])
        assert failed.value.reason == ("CASecretMissing" if how == "deleted" else "CAInvalid")
        with pytest.raises(TrustDomainError):  # the cached CA no longer signs
            await trust.get("a.example", ("ns", "id"))
        assert ("ns", "id") in trust.take_waiting("a.example")
        assert trust.referencing("Secret", OPNS, "brought") == ["a.example"]

    run(scenario())


# --- item 1: merged bundles ------------------------------------------------------------------------------------------


def roots_in(kube: FakeKube, namespace: str, name: str = "meshtls-bundle") -> set[str]:
    data = kube.configmaps[(namespace, name)]["data"]
    return {c.subject.rfc4514_string() for c in load_certificates(data["ca.crt"].encode())}


def test_two_trust_domains_in_one_namespace_share_one_merged_bundle() -> None:
    kube = FakeKube()
    for name in ("a.example", "b.example"):
        kube.trust_domains[name] = td(name)
    trust = make(kube)

    async def scenario() -> None:
        a, b = await trust.get("a.example"), await trust.get("b.example")
        await trust.bind(a, ("m", "ida"))
        await trust.bind(b, ("m", "idb"))
        await trust.bind(a, ("other", "x"))
        cm = kube.configmaps[("m", "meshtls-bundle")]
        assert roots_in(kube, "m") == {a.ca.certificate.subject.rfc4514_string(),
                                       b.ca.certificate.subject.rfc4514_string()}
        assert len(load_crls(cm["data"]["crl.pem"].encode())) == 2  # each issuer's CRL
        assert cm["annotations"][ANNOTATION_TRUST_DOMAINS] == "a.example,b.example"
        assert roots_in(kube, "other") == {a.ca.certificate.subject.rfc4514_string()}
        # a revocation under a keeps b's root and CRL in the shared bundle
        await trust.publish(a)
        assert len(roots_in(kube, "m")) == 2
        # b's last identity leaves m: its root leaves the bundle, a's stays
        await trust.unbind(("m", "idb"))
        assert roots_in(kube, "m") == {a.ca.certificate.subject.rfc4514_string()}
        assert kube.configmaps[("m", "meshtls-bundle")]["annotations"][ANNOTATION_TRUST_DOMAINS] == "a.example"
        # an identity moving from a to b moves the namespace's roots with it
        await trust.bind(b, ("m", "ida"))
        assert roots_in(kube, "m") == {b.ca.certificate.subject.rfc4514_string()}
        # b deleted: its roots leave the shared bundles; a namespace only it served keeps its last bundle
        await trust.bind(a, ("m", "third"))
        gone = trust.forget("b.example")
        assert gone is not None
        await trust.withdraw(gone)
        assert roots_in(kube, "m") == {a.ca.certificate.subject.rfc4514_string()}

    run(scenario())


def test_a_namespace_whose_last_identity_left_keeps_its_bundle_and_crl() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))
        await trust.unbind(("m", "ida"))
        assert ("m", "meshtls-bundle") in kube.configmaps

    run(scenario())


# (names Kubernetes writes itself, kube-root-ca.crt among them, are refused by the spec before this point)
@pytest.mark.parametrize("squatter", ["team-bundle", "meshtls-bundle"])
def test_a_squatted_bundle_name_is_a_condition_and_is_left_alone(squatter: str) -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example", {"bundle": {"configMapName": squatter}})
    foreign = {"data": {"ca.crt": "theirs"}, "labels": {}, "annotations": {}, "uid": "u", "resourceVersion": "1"}
    kube.configmaps[("m", squatter)] = dict(foreign)
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))
        assert kube.configmaps[("m", squatter)] == foreign  # never written
        status = trust.status_of(a)
        published = next(c for c in status["conditions"] if c["type"] == "BundlePublished")
        assert published["status"] == "False" and published["reason"] == "BundleConflict"
        assert f"m/{squatter}" in published["message"]
        assert next(c for c in status["conditions"] if c["type"] == "Ready")["status"] == "False"
        assert [p[0] for p in trust.new_problems(a)] == ["BundleConflict"]
        assert trust.new_problems(a) == []  # once per change
        # the squatter leaves: the next publish takes the name, the condition clears
        del kube.configmaps[("m", squatter)]
        await trust.publish(a)
        assert kube.configmaps[("m", squatter)]["labels"][LABEL_MANAGED_BY] == MANAGED_BY
        assert next(c for c in trust.status_of(a)["conditions"] if c["type"] == "BundlePublished")["status"] == "True"

    run(scenario())


def test_a_renamed_bundle_is_published_under_the_new_name_and_the_old_one_removed() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    kube.trust_domains["b.example"] = td("b.example")
    trust = make(kube)

    async def scenario() -> None:
        a, b = await trust.get("a.example"), await trust.get("b.example")
        await trust.bind(a, ("m", "ida"))
        await trust.bind(a, ("solo", "ida"))
        await trust.bind(b, ("m", "idb"))
        await trust.publish(a)
        kube.trust_domains["a.example"] = td("a.example", {"bundle": {"configMapName": "renamed"}})
        a, _ = await trust.ensure(kube.trust_domains["a.example"])
        await trust.publish(a)
        assert ("solo", "meshtls-bundle") not in kube.configmaps  # ours, nobody else's: removed
        assert ("solo", "renamed") in kube.configmaps
        assert roots_in(kube, "m") == {b.ca.certificate.subject.rfc4514_string()}  # shared: a left it
        assert roots_in(kube, "m", "renamed") == {a.ca.certificate.subject.rfc4514_string()}

    run(scenario())


def test_a_tampered_bundle_is_judged_by_content() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)
    other = generate_ca("evil.example", T0)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))
        good = dict(kube.configmaps[("m", "meshtls-bundle")]["data"])
        assert not trust.bundle_changed("m", "meshtls-bundle", good)  # our own write coming back
        for bad in (None, {**good, "ca.crt": good["ca.crt"] + other.roots_pem.decode()}, {**good, "crl.pem": ""}):
            assert trust.bundle_changed("m", "meshtls-bundle", bad)
            kube.configmaps[("m", "meshtls-bundle")]["data"] = dict(bad or {})
            await trust.publish_bundle("m", "meshtls-bundle")
            assert kube.configmaps[("m", "meshtls-bundle")]["data"] == good

    run(scenario())


# --- item 6 and 10 --------------------------------------------------------------------------------------------------


def test_resolution_uses_pin_then_default() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        assert (await trust.resolve(None, None)).name == "a.example"
        kube.trust_domains["b.example"] = td("b.example")
        assert (await trust.resolve(None, "a.example")).name == "a.example"  # pinned: a second TD changes nothing
        with pytest.raises(TrustDomainError, match=r"a\.example, b\.example"):
            await trust.resolve(None, None, ("ns", "new"))
        kube.trust_domains["b.example"] = td("b.example", default=True)
        assert (await trust.resolve(None, None)).name == "b.example"

    run(scenario())


def test_an_unchanged_trust_domain_writes_its_status_once() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        for _ in range(10):
            trust.clock.advance(dt.timedelta(seconds=30))  # type: ignore[attr-defined]
            a, _changes = await trust.ensure(kube.trust_domains["a.example"])
            await trust.write_status(a)
        assert kube.count("patch_trust_domain_status") == 1

    run(scenario())


# --- item 4 (run-time part): the CRL is re-signed well before nextUpdate ---------------------------------------------


@pytest.mark.parametrize("validity_s", [300, 600, 86400, 864000])  # the spec's range: 5m-240h
def test_a_crl_resign_is_scheduled_half_way_whatever_the_resync(validity_s: int) -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example", {"crl": {"validity": f"{validity_s}s"}})
    clock = FakeClock(T0)
    trust = TrustDomains(kube, clock, OPNS, resync=dt.timedelta(days=7))  # type: ignore[arg-type]

    async def scenario() -> None:
        runtime = await trust.get("a.example")
        for _ in range(4):
            signed_at = clock.now()
            due = trust.next_phase_check(runtime)
            assert due is not None and due <= signed_at + dt.timedelta(seconds=validity_s) / 2
            clock.advance(due - clock.now())
            before = runtime.crl_number
            runtime, _changes = await trust.ensure(kube.trust_domains["a.example"])
            assert runtime.crl_number == before + 1  # re-signed for age: a new number
            crl = load_crls(runtime.crl)[0]
            assert crl.next_update_utc is not None and crl.next_update_utc > clock.now() + dt.timedelta(
                seconds=validity_s) / 2 - dt.timedelta(seconds=1)

    run(scenario())


# --- a bundle meshtls wrote is patched without a read first; anything unexpected is read and decided -------------


def _revocation(serial: int) -> list[RevokedCertificate]:
    return [RevokedCertificate(serial, T0, T0 + dt.timedelta(hours=1), RevocationReason.CESSATION_OF_OPERATION)]


def _crl_serials(kube: FakeKube, namespace: str) -> set[int]:
    return {r.serial_number for crl in load_crls(kube.configmaps[(namespace, "meshtls-bundle")]["data"]["crl.pem"]
                                                   .encode()) for r in crl}


def _bundle_calls(kube: FakeKube, namespace: str) -> list[str]:
    return [name for name, args in kube.calls if args[:2] == (namespace, "meshtls-bundle")]


SQUATTER = {"data": {"ca.crt": "theirs"}, "labels": {}, "annotations": {}, "uid": "u9", "resourceVersion": "900"}
CHANGES_OF_HANDS = {
    "ours still": lambda cm: None,
    "relabelled by someone else": lambda cm: cm["labels"].update({LABEL_MANAGED_BY: "someone-else"}),
    "label removed": lambda cm: cm["labels"].pop(LABEL_MANAGED_BY),
}


@pytest.mark.parametrize("change", sorted(CHANGES_OF_HANDS))
def test_a_revocation_patches_our_bundle_in_one_request_and_never_one_not_ours(change: str) -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))  # the first write: read, then created
        assert _bundle_calls(kube, "m") == ["read_configmap", "write_configmap"]
        CHANGES_OF_HANDS[change](kube.configmaps[("m", "meshtls-bundle")])
        before = dict(kube.configmaps[("m", "meshtls-bundle")])
        kube.calls.clear()
        await trust.revoke(a, _revocation(0x1234))
        cm = kube.configmaps[("m", "meshtls-bundle")]
        if change == "ours still":
            assert _bundle_calls(kube, "m") == ["update_owned_configmap"]  # no read first
            assert 0x1234 in _crl_serials(kube, "m") and cm["labels"][LABEL_MANAGED_BY] == MANAGED_BY
            return
        # the patch's label test failed: read, judged not ours, left exactly as it is, and reported
        assert _bundle_calls(kube, "m") == ["update_owned_configmap", "read_configmap"]
        assert cm == before
        published = next(c for c in trust.status_of(a)["conditions"] if c["type"] == "BundlePublished")
        assert published["status"] == "False" and published["reason"] == "BundleConflict"
        kube.calls.clear()
        await trust.revoke(a, _revocation(0x5678))  # not ours any more: read first every time, never written
        assert _bundle_calls(kube, "m") == ["read_configmap"] and kube.configmaps[("m", "meshtls-bundle")] == before

    run(scenario())


@pytest.mark.parametrize("what", ["deleted", "replaced by a squatter", "409", "422 on our own", "403 without patch",
                                  "500"])
def test_a_failed_patch_falls_back_to_read_and_decide(what: str) -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))
        if what == "deleted":
            del kube.configmaps[("m", "meshtls-bundle")]
        elif what == "replaced by a squatter":
            kube.configmaps[("m", "meshtls-bundle")] = dict(SQUATTER)
        elif what == "409":
            kube.failures["update_owned_configmap"] = [Conflict("the object has been modified")]
        elif what == "422 on our own":  # e.g. a label test failing on a version the server merged otherwise
            kube.failures["update_owned_configmap"] = [ApiError(422, "Invalid", "test failed")]
        elif what == "403 without patch":  # a chart's RBAC from before the patch: read and replaced, as before
            kube.failures["update_owned_configmap"] = [ApiError(403, "Forbidden", "cannot patch configmaps")]
        else:
            kube.failures["update_owned_configmap"] = [ApiError(500, "Internal Server Error", "etcd timeout")]
        kube.calls.clear()
        await trust.revoke(a, _revocation(0x1234))
        calls = _bundle_calls(kube, "m")
        if what == "replaced by a squatter":
            assert calls == ["update_owned_configmap", "read_configmap"]
            assert kube.configmaps[("m", "meshtls-bundle")] == SQUATTER
        elif what == "500":  # not a conflict: nothing written, the namespace checked, the next publish tries again
            assert calls == ["update_owned_configmap"] and kube.count("namespace_exists", "m") == 1
            assert 0x1234 not in _crl_serials(kube, "m")
            kube.calls.clear()
            await trust.publish(a)
            assert _bundle_calls(kube, "m") == ["update_owned_configmap"] and 0x1234 in _crl_serials(kube, "m")
        else:  # read, then created (deleted) or replaced guarded by the version read
            assert calls == ["update_owned_configmap", "read_configmap", "write_configmap"]
            assert 0x1234 in _crl_serials(kube, "m")
            assert kube.configmaps[("m", "meshtls-bundle")]["labels"][LABEL_MANAGED_BY] == MANAGED_BY

    run(scenario())


def test_our_own_patch_coming_back_is_not_a_change_but_the_same_content_written_by_another_is() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        a = await trust.get("a.example")
        await trust.bind(a, ("m", "ida"))
        await trust.revoke(a, _revocation(0x1))
        first = kube.configmaps[("m", "meshtls-bundle")]
        first_data, first_version = dict(first["data"]), first["resourceVersion"]
        await trust.revoke(a, _revocation(0x2))
        second = kube.configmaps[("m", "meshtls-bundle")]
        # the first patch's event arrives after the second was written: ours, no restore
        assert not trust.bundle_changed("m", "meshtls-bundle", first_data, first_version)
        # the same older content under a version meshtls did not write (a rollback that drops a revocation): restored
        assert trust.bundle_changed("m", "meshtls-bundle", first_data, "7777")
        await trust.publish_bundle("m", "meshtls-bundle")  # (reads first: what is there is not known any more)
        assert {0x1, 0x2} <= _crl_serials(kube, "m")
        # an event of a version once ours but already acknowledged is judged by content again
        assert trust.bundle_changed("m", "meshtls-bundle", first_data, first_version)
        assert not trust.bundle_changed("m", "meshtls-bundle", dict(second["data"]), "8888")  # by content: as wanted
        assert trust.bundle_changed("m", "meshtls-bundle", None, "")  # deleted

    run(scenario())


def test_deletions_arriving_together_ask_once_whether_their_trust_domain_exists() -> None:
    kube = FakeKube()
    kube.trust_domains["a.example"] = td("a.example")
    trust = make(kube)

    async def scenario() -> None:
        await trust.get("a.example")
        kube.calls.clear()
        found = await asyncio.gather(*(trust.get_existing("a.example") for _ in range(20)))
        assert all(r is not None and r.name == "a.example" for r in found)
        assert kube.count("get_trust_domain", "a.example") == 1
        del kube.trust_domains["a.example"]  # asked again later: a fresh answer
        assert await trust.get_existing("a.example") is None
        assert kube.count("get_trust_domain", "a.example") == 2 and trust.runtime("a.example") is None

    run(scenario())
