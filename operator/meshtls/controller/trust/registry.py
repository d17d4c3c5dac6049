"""The trust domains this operator signs for, loaded on demand and kept in memory: which one an identity uses
(resolve, get), loading or creating its CA (ensure), and the sources it reads (a brought CA, federated bundles).

A CA signs nothing before the state Secret holds it (`state.save_state`), and a CA is never generated while one is
saved or held in memory: a deleted state Secret is written back from memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

from meshtls.api.constants import ANNOTATION_ROTATE_CA
from meshtls.api.model import SpecError, TrustDomainSpec, parse_trust_domain
from meshtls.api.names import state_secret_name
from meshtls.api.reasons import Reason
from meshtls.controller import metrics
from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.trust import bundles, revocation, rotation, status
from meshtls.controller.trust.domain import BundleKey, IdentitySet, Key, TrustDomainError, TrustDomainRuntime
from meshtls.controller.trust.revocation import crl_inputs, crls_stale, sign_crls
from meshtls.controller.trust.rotation import advance
from meshtls.controller.trust.sources import federated_bundles, load_brought_ca
from meshtls.controller.trust.state import load_pair, read_revocations, save_state
from meshtls.controller.trust.status import reported_from
from meshtls.kube import Kube
from meshtls.pki import (
    RevokedCertificate,
    drop_expired,
    generate_ca,
)
from meshtls.policy.ca_rotation import RotationState
from meshtls.policy.clock import Clock
from meshtls.policy.trust_policy import choose_trust_domain, default_conflict, marked_default

log = logging.getLogger("meshtls.trust")
RESYNC = dt.timedelta(seconds=30)


class TrustDomains:
    """The trust domains this operator signs for, loaded on demand and kept in memory."""

    def __init__(self, kube: Kube, clock: Clock, operator_namespace: str, resync: dt.timedelta = RESYNC,
                 served: list[str] | None = None) -> None:
        self.kube = kube
        self.clock = clock
        self.namespace = operator_namespace
        self.resync = resync
        self.served = list(served or [])  # the namespaces this operator serves; empty: all
        self.domains: dict[str, TrustDomainRuntime] = {}
        self._load_lock = asyncio.Lock()
        self.problems: dict[str, tuple[str, str]] = {}  # trust domain -> (reason, message) while unusable
        self.attempted: set[str] = set()  # trust domains whose load was tried since the start
        self.defaults: dict[str, bool] = {}  # trust domain -> marked default, as last seen
        self.refs: dict[str, set[tuple[str, str, str]]] = {}  # trust domain -> (kind, namespace, name) it reads
        # (trust domain, Secret in the operator's namespace) -> resourceVersion at its last load (None: absent)
        self.read_versions: dict[tuple[str, str], str | None] = {}
        self.waiting: dict[str, set[Key]] = {}  # trust domain ("" = the default) -> identities that could not use it
        self.published: dict[BundleKey, dict[str, str]] = {}  # bundle ConfigMap -> data last written or confirmed
        self.bundle_conflicts: dict[BundleKey, str] = {}  # bundle ConfigMap squatted by an object not ours
        self.bundle_locks: dict[BundleKey, asyncio.Lock] = {}
        # bundle ConfigMap -> resourceVersions of meshtls's own patches whose watch event has not come back yet
        self.own_versions: dict[BundleKey, list[str]] = {}
        self._asking: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # trust domain -> its GET in flight

    def loaded(self) -> list[TrustDomainRuntime]:
        return list(self.domains.values())

    def runtime(self, name: str) -> TrustDomainRuntime | None:
        return self.domains.get(name)

    def forget(self, name: str) -> TrustDomainRuntime | None:
        """The TrustDomain is gone: nothing is signed under it from now on."""
        self.problems.pop(name, None)
        self.defaults.pop(name, None)
        self.refs.pop(name, None)
        for key in [k for k in self.read_versions if k[0] == name]:
            del self.read_versions[key]
        return self.domains.pop(name, None)

    def take_waiting(self, name: str) -> set[Key]:
        return self.waiting.pop(name, set()) | self.waiting.pop("", set())

    def _wait(self, name: str, key: Key | None) -> None:
        if key is not None:
            self.waiting.setdefault(name, set()).add(key)

    def referencing(self, kind: str, namespace: str, name: str) -> list[str]:
        """Trust domains that read this Secret or ConfigMap (a brought CA, a federated bundle, their state)."""
        return sorted(td for td, refs in self.refs.items() if (kind, namespace, name) in refs)

    async def resolve(self, requested: str | None, pinned: str | None, key: Key | None = None) -> TrustDomainRuntime:
        """The trust domain an identity uses: spec.trustDomain, else the one it was issued under, else the only or
        the default TrustDomain (policy.trust_policy.choose_trust_domain)."""
        name = requested or pinned
        if name is None:
            bodies = await self.kube.run(self.kube.list_trust_domains)
            domains = {str(b["metadata"]["name"]): marked_default(b["metadata"].get("annotations")) for b in bodies}
            choice = choose_trust_domain(None, None, domains)
            if choice.name is None:
                self._wait("", key)
                raise TrustDomainError(choice.reason, choice.message)
            name = choice.name
        where = "spec.trustDomain" if requested else "status.trustDomain (the trust domain it was issued under)"
        return await self.get(name, key, where)

    async def get(self, name: str | None, key: Key | None = None, where: str = "spec.trustDomain"
                  ) -> TrustDomainRuntime:
        """The runtime for `name`; refuses while the trust domain is unusable (its CA is not there to sign)."""
        if name is None:
            return await self.resolve(None, None, key)
        if name in self.problems:
            # the trust domain's own re-check (timer, watches) clears this; the identity is woken then
            self._wait(name, key)
            raise TrustDomainError(*self.problems[name])
        if name in self.domains:
            return self.domains[name]
        async with self._load_lock:
            if name in self.domains:
                return self.domains[name]
            body = await self.kube.run(self.kube.get_trust_domain, name)
            if body is None:
                self._wait(name, key)
                raise TrustDomainError(Reason.UNKNOWN_TRUST_DOMAIN, f"{where}: TrustDomain {name!r} does not exist")
            try:
                runtime, _ = await self._load_reporting(body)
            except TrustDomainError:
                self._wait(name, key)
                raise
            return runtime

    async def get_existing(self, name: str) -> TrustDomainRuntime | None:
        """The runtime only if its TrustDomain still exists (asked of the API): a deletion revokes nothing under
        a trust domain that is gone."""
        asking = self._asking.get(name)
        if asking is None:  # deletions arriving together share one look: a storm asks a few times, not a thousand
            asking = asyncio.ensure_future(self.kube.run_first(self.kube.get_trust_domain, name))
            self._asking[name] = asking
            asking.add_done_callback(lambda done: self._asking.pop(name) if self._asking.get(name) is done else None)
        body = await asyncio.shield(asking)  # one caller cancelled must not cancel the others' answer
        if body is None:
            self.forget(name)
            return None
        return self.domains.get(name)

    async def ensure(self, body: dict[str, Any]) -> tuple[TrustDomainRuntime, list[tuple[str, str]]]:
        """Create or reload a trust domain (on create, update and operator start); returns the phase changes made."""
        async with self._load_lock:
            return await self._load_reporting(body)

    async def _load_reporting(self, body: dict[str, Any]) -> tuple[TrustDomainRuntime, list[tuple[str, str]]]:
        name = str(body["metadata"]["name"])
        self.attempted.add(name)
        self.defaults[name] = marked_default(body["metadata"].get("annotations"))
        try:
            result = await self._load(body)
        except TrustDomainError as exc:
            self.problems[name] = (exc.reason, exc.message)
            raise
        self.problems.pop(name, None)
        return result

    def default_conflict(self) -> list[str]:
        return default_conflict(self.defaults)

    async def _load(self, body: dict[str, Any]) -> tuple[TrustDomainRuntime, list[tuple[str, str]]]:
        try:
            spec = parse_trust_domain(body)
        except SpecError as exc:
            raise TrustDomainError(exc.reason, str(exc)) from None
        now = self.clock.now()
        state_name = state_secret_name(spec.name)
        self.refs[spec.name] = _references(spec, self.namespace, state_name)
        state = await self.kube.run(self.kube.read_secret, self.namespace, state_name)
        if state.exists and not state.managed:
            raise TrustDomainError(Reason.STATE_SECRET_CONFLICT,
                                   f"Secret {self.namespace}/{state_name} exists and is not managed by meshtls")
        brought = await load_brought_ca(self, spec, now) if spec.ca_secret_ref else None
        known = self.domains.get(spec.name)
        signing = load_pair(state, "ca", now) if state.exists else None
        changes: list[tuple[str, str]] = []
        restored = False
        if signing is None and known is not None:
            # the state Secret is gone but this process holds the key that signed live certificates: write it back,
            # never mint a new CA under them
            signing, restored = known.ca, True
            changes.append((Reason.CA_STATE_RESTORED, f"Secret {self.namespace}/{state_name} was missing: restored CA "
                                               f"sha256:{signing.fingerprint[:16]} from memory"))
        elif signing is None:
            signing = brought or generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
            changes.append((Reason.CA_READY, f"{'loaded the brought' if brought else 'generated a'} CA "
                                       f"sha256:{signing.fingerprint[:16]}"))
        if changes:
            log.info("trust domain %s: %s", spec.name, changes[-1][1])
        if state.exists:
            revocations, number = read_revocations(state)
        elif known is not None:
            revocations, number = known.revocations, known.crl_number
        else:
            revocations, number = [], 1
        runtime = known
        if runtime is None or runtime.ca.fingerprint != signing.fingerprint:
            runtime = TrustDomainRuntime(spec, signing, revocations, number)
            if known is not None:
                runtime.namespaces, runtime.identities = known.namespaces, known.identities
                runtime.selected, runtime.bundle_names = known.selected, known.bundle_names
                runtime.last_status, runtime.reported = known.last_status, known.reported
            else:
                runtime.last_status = dict(body.get("status") or {})
                runtime.reported = reported_from(runtime.last_status)
                runtime.identities = await self._identities_of(spec.name)
        runtime.spec = spec
        runtime.revocations, runtime.crl_number = revocations, max(number, runtime.crl_number)
        if state.exists:
            runtime.next_ca = load_pair(state, "next", now)
            runtime.previous_ca = load_pair(state, "previous", now)
            raw_rotation = state.data.get("rotation.json")
            runtime.rotation = RotationState.from_json(json.loads(raw_rotation)) if raw_rotation else RotationState()
        elif not restored:
            runtime.next_ca = runtime.previous_ca = None
            runtime.rotation = RotationState()
        request = (body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ROTATE_CA)
        replacement = brought is not None and brought.fingerprint not in {c.fingerprint for c in runtime.trusted}
        changes += advance(runtime, now, request, brought if replacement else None)
        if changes or not state.exists:
            # persisted before anything is signed with it: a CA whose key is lost would strand its certificates
            await save_state(self.kube, self.namespace, runtime, state)
        try:
            runtime.federated_roots, runtime.federated_crls = await federated_bundles(self, spec, runtime)
            runtime.federation_problem = None
        except TrustDomainError as exc:
            # federation degrades (the last bundles read stay), local issuance goes on
            runtime.federation_problem = (exc.reason, exc.message)
        self.domains[spec.name] = runtime
        if crls_stale(runtime, now):
            if runtime.crl_signed is not None and runtime.crl_signed[1] == crl_inputs(runtime):
                runtime.crl_number += 1  # re-signed for age alone: still a new CRL, so a new number
                current = await self.kube.run(self.kube.read_secret, self.namespace, state_name)
                await save_state(self.kube, self.namespace, runtime, current)
            sign_crls(runtime, now)
        metrics.ca_expiration.labels(spec.name).set(runtime.ca.not_after.timestamp())
        metrics.crl_entries.labels(spec.name).set(len(drop_expired(runtime.revocations, now)))
        return runtime, changes

    async def _identities_of(self, name: str) -> IdentitySet:
        """At a trust domain's first load, the identities issued under it (or naming it): its bundles must carry
        every namespace's full set of roots before those identities are reconciled again."""
        try:
            bodies = []
            scopes: list[str | None] = list(self.served) or [None]  # a namespaced operator lists where it serves
            for namespace in scopes:
                bodies += await self.kube.run(self.kube.list_workload_identities, namespace)
        except Exception as exc:  # only a head start: identities bind themselves as they reconcile
            log.warning("listing identities for trust domain %s failed: %s", name, exc)
            return IdentitySet()
        return IdentitySet(IdentityKey(str(b["metadata"]["namespace"]), str(b["metadata"]["name"])) for b in bodies
                           if ((b.get("spec") or {}).get("trustDomain")
                               or (b.get("status") or {}).get("trustDomain")) == name
                           and not b["metadata"].get("deletionTimestamp"))

    # --- rotation, revocation, bundles and status: the work lives in the modules of this package ---------------

    def next_phase_check(self, runtime: TrustDomainRuntime) -> dt.datetime | None:
        return rotation.next_phase_check(runtime, self.clock.now(), self.resync)

    async def revoke(self, runtime: TrustDomainRuntime, entries: list[RevokedCertificate]) -> None:
        await revocation.revoke(self, runtime, entries)

    async def bind(self, runtime: TrustDomainRuntime, key: Key) -> None:
        await bundles.bind(self, runtime, key)

    async def unbind(self, key: Key) -> None:
        await bundles.unbind(self, key)

    async def withdraw(self, runtime: TrustDomainRuntime) -> None:
        await bundles.withdraw(self, runtime)

    async def publish(self, runtime: TrustDomainRuntime, namespaces: list[str] | None = None) -> int:
        return await bundles.publish(self, runtime, namespaces)

    async def publish_bundle(self, namespace: str, name: str, drop_if_empty: bool = False) -> bool:
        return await bundles.publish_bundle(self, namespace, name, drop_if_empty)

    def contributors(self, namespace: str, name: str) -> list[TrustDomainRuntime]:
        return bundles.contributors(self, namespace, name)

    def wanted_bundle(self, namespace: str, name: str) -> dict[str, str] | None:
        return bundles.wanted_bundle(self, namespace, name)

    def bundle_changed(self, namespace: str, name: str, data: dict[str, str] | None, version: str = "") -> bool:
        return bundles.bundle_changed(self, namespace, name, data, version)

    def conflicts_of(self, runtime: TrustDomainRuntime) -> list[str]:
        return bundles.conflicts_of(self, runtime)

    def status_of(self, runtime: TrustDomainRuntime) -> dict[str, Any]:
        return status.status_of(self, runtime)

    def problems_of(self, runtime: TrustDomainRuntime) -> list[tuple[str, str, str]]:
        return status.problems_of(self, runtime)

    def new_problems(self, runtime: TrustDomainRuntime) -> list[tuple[str, str]]:
        return status.new_problems(self, runtime)

    async def write_status(self, runtime: TrustDomainRuntime) -> bool:
        return await status.write_status(self, runtime)

    def failed_status(self, old: dict[str, Any], reason: str, message: str) -> dict[str, Any] | None:
        return status.failed_status(self, old, reason, message)


def _references(spec: TrustDomainSpec, operator_namespace: str, state_name: str) -> set[tuple[str, str, str]]:
    refs = {("Secret", operator_namespace, state_name)}
    if spec.ca_secret_ref:
        refs.add(("Secret", operator_namespace, spec.ca_secret_ref))
    for fed in spec.federates_with:
        for kind, field_name in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = fed.get(field_name)
            if isinstance(ref, dict) and ref.get("name") and ref.get("namespace"):
                refs.add((kind, str(ref["namespace"]), str(ref["name"])))
    return refs
