"""Trust domains at run time: the CAs (signing, next, previous), revocations and CRLs, and the bundles from them.

State lives in one Secret per trust domain in the operator's namespace (`meshtls-ca-<trust domain>`): the signing
CA's key (never anywhere else), the next or previous CA during a rotation, the rotation phase, the revocation
entries and the CRL number. A CA signs nothing before that Secret holds it. Revocations are batched: a burst of
deletions costs one CRL signing and one ConfigMap write per namespace, not one per deletion.

A namespace's bundle ConfigMap (per name) carries the roots and CRLs of every trust domain that publishes into it
under that name, merged in the order of the trust domains' names.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from meshtls.api.constants import (
    ANNOTATION_TRUST_DOMAINS,
    LABEL_BUNDLE,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
)
from meshtls.api.model import SpecError, TrustDomainSpec, parse_trust_domain
from meshtls.api.objects import SecretSnapshot
from meshtls.controller import metrics
from meshtls.kube import Conflict, Kube
from meshtls.kube.client import NotFound
from meshtls.pki import (
    CertificateAuthority,
    PKIError,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    check_ca_can_sign_svids,
    crl_pem,
    drop_expired,
    generate_ca,
    load_ca,
    load_crls,
)
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE, RotationState, next_rotation_step
from meshtls.policy.clock import Clock
from meshtls.policy.issuance import condition, iso
from meshtls.policy.trust_policy import (
    BundleContribution,
    bundle_matches,
    bundle_trust_domains,
    choose_trust_domain,
    crl_resign_at,
    default_conflict,
    marked_default,
    merge_bundle,
    status_patch,
    with_condition,
)

log = logging.getLogger("meshtls.trust")
BATCH_WINDOW = 0.25  # seconds a revocation waits for others to share its CRL signing
RESYNC = dt.timedelta(seconds=30)
ANNOTATION_ROTATE_CA = "meshtls.dev/rotate-ca"  # set by `meshtls ca rotate`: start a CA rotation now
Key = tuple[str, str]
BundleKey = tuple[str, str]  # (namespace, ConfigMap name)


def state_secret_name(trust_domain: str) -> str:
    return f"meshtls-ca-{trust_domain.replace('_', '-')}"[:253].rstrip(".-")


class IdentitySet(set[tuple[str, str]]):
    """The identities issued under a trust domain, counted per namespace: "has it any there?" is asked at every
    reconcile, and must not cost a scan of ten thousand entries."""

    def __init__(self, keys: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.per_namespace: Counter[str] = Counter()
        for key in keys:
            self.add(key)

    def add(self, key: tuple[str, str]) -> None:
        if key not in self:
            super().add(key)
            self.per_namespace[key[0]] += 1

    def discard(self, key: object) -> None:
        if key in self and isinstance(key, tuple):
            super().discard(key)
            self.per_namespace[key[0]] -= 1
            if self.per_namespace[key[0]] <= 0:
                del self.per_namespace[key[0]]

    def in_namespace(self, namespace: str) -> bool:
        return self.per_namespace.get(namespace, 0) > 0


@dataclass
class TrustDomainRuntime:
    spec: TrustDomainSpec
    ca: CertificateAuthority  # signs now
    revocations: list[RevokedCertificate]
    crl_number: int
    next_ca: CertificateAuthority | None = None  # Preparing: trusted, not yet signing
    previous_ca: CertificateAuthority | None = None  # Rotating: trusted until its last certificate expires
    rotation: RotationState = field(default_factory=RotationState)
    warning: str | None = None  # e.g. a brought CA inside its rotation window
    federated_roots: str = ""
    federated_crls: str = ""
    federation_problem: tuple[str, str] | None = None  # (reason, message): the last good federated bundles stay
    crl: bytes = b""
    crl_signed: tuple[dt.datetime, tuple[object, ...]] | None = None
    namespaces: set[str] = field(default_factory=set)  # every namespace it ever published into
    selected: set[str] = field(default_factory=set)  # namespaces spec.bundle.namespaceSelector picks
    identities: IdentitySet = field(default_factory=IdentitySet)
    bundle_names: set[str] = field(default_factory=set)  # ConfigMap names it published under (a rename cleans up)
    last_status: dict[str, Any] | None = None  # what the API holds, to write only what changes
    reported: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition type -> problem Evented
    pending: list[tuple[list[RevokedCertificate], asyncio.Future[None]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ca_key_id(self) -> bytes:
        return self.ca.authority_key_identifier.key_identifier or b""

    @property
    def trusted(self) -> list[CertificateAuthority]:
        """Every CA whose certificates sidecars must accept now, the signing one first."""
        return [c for c in (self.ca, self.next_ca, self.previous_ca) if c is not None]

    def crls_stale(self, now: dt.datetime) -> bool:
        """Re-sign when what the CRLs say changed, or half their validity has passed: sidecars refuse every peer
        once a CRL is past its nextUpdate, so it is renewed long before that, but not on every look."""
        signed = self.crl_signed
        return (signed is None or signed[1] != self.crl_inputs()
                or now >= crl_resign_at(signed[0], self.spec.crl_validity))

    def crl_inputs(self) -> tuple[object, ...]:
        return (self.crl_number, tuple(sorted(e.serial_number for e in self.revocations)),
                tuple(ca.fingerprint for ca in self.trusted))

    def sign_crls(self, now: dt.datetime) -> None:
        # One CRL per trusted CA: a sidecar checking a leaf needs the CRL of that leaf's issuer.
        self.crl_signed = (now, self.crl_inputs())
        self.crl = b"".join(crl_pem(build_crl(ca, self.revocations, self.crl_number, now, self.spec.crl_validity))
                            for ca in self.trusted)

    def contribution(self) -> BundleContribution:
        roots = "".join(ca.roots_pem.decode() for ca in self.trusted) + self.federated_roots
        return BundleContribution(self.name, roots, self.crl.decode() + self.federated_crls)

    def bundle_data(self) -> dict[str, str]:
        """This trust domain's bundle alone (a namespace no other trust domain publishes into gets exactly this)."""
        return merge_bundle([self.contribution()])

    def active_in(self, namespace: str) -> bool:
        return namespace in self.selected or self.identities.in_namespace(namespace)


class TrustDomainError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _rotate_before(runtime: TrustDomainRuntime) -> dt.timedelta:
    """The rotation window, relative to the signing CA's own lifetime (a brought CA's may differ from the spec)."""
    return runtime.spec.rotate_before(runtime.ca.not_after - runtime.ca.not_before)


def _load_pair(state: SecretSnapshot, prefix: str, now: dt.datetime) -> CertificateAuthority | None:
    cert, key = state.data.get(f"{prefix}.crt"), state.data.get(f"{prefix}.key")
    if not cert or not key:
        return None
    try:
        return load_ca(cert, key, now, state.data.get(f"{prefix}-chain.crt", b""))
    except PKIError as exc:
        if prefix == "previous":  # an expired previous CA simply retires
            return None
        raise TrustDomainError("CAInvalid", f"the CA in the state Secret ({prefix}) is unusable: {exc}") from None


def _ready_problem(status: dict[str, Any] | None) -> tuple[str, str] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "False":
            return str(c.get("reason")), str(c.get("message"))
    return None


class TrustDomains:
    """The trust domains this operator signs for, loaded on demand and kept in memory."""

    def __init__(self, kube: Kube, clock: Clock, operator_namespace: str, resync: dt.timedelta = RESYNC,
                 served: list[str] | None = None) -> None:
        self.kube = kube
        self.clock = clock
        self.namespace = operator_namespace
        self.resync = resync
        self.served = list(served or [])  # the namespaces this operator serves; empty: all
        self._domains: dict[str, TrustDomainRuntime] = {}
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
        self._bundle_locks: dict[BundleKey, asyncio.Lock] = {}

    def loaded(self) -> list[TrustDomainRuntime]:
        return list(self._domains.values())

    def runtime(self, name: str) -> TrustDomainRuntime | None:
        return self._domains.get(name)

    def forget(self, name: str) -> TrustDomainRuntime | None:
        """The TrustDomain is gone: nothing is signed under it from now on."""
        self.problems.pop(name, None)
        self.defaults.pop(name, None)
        self.refs.pop(name, None)
        for key in [k for k in self.read_versions if k[0] == name]:
            del self.read_versions[key]
        return self._domains.pop(name, None)

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
        if name in self._domains:
            return self._domains[name]
        async with self._load_lock:
            if name in self._domains:
                return self._domains[name]
            body = await self.kube.run(self.kube.get_trust_domain, name)
            if body is None:
                self._wait(name, key)
                raise TrustDomainError("UnknownTrustDomain", f"{where}: TrustDomain {name!r} does not exist")
            try:
                runtime, _ = await self._load_reporting(body)
            except TrustDomainError:
                self._wait(name, key)
                raise
            return runtime

    async def get_existing(self, name: str) -> TrustDomainRuntime | None:
        """The runtime only if its TrustDomain still exists (asked of the API): a deletion revokes nothing under
        a trust domain that is gone."""
        body = await self.kube.run(self.kube.get_trust_domain, name)
        if body is None:
            self.forget(name)
            return None
        return self._domains.get(name)

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
            raise TrustDomainError("StateSecretConflict",
                                   f"Secret {self.namespace}/{state_name} exists and is not managed by meshtls")
        brought = await self._load_brought_ca(spec, now) if spec.ca_secret_ref else None
        known = self._domains.get(spec.name)
        signing = _load_pair(state, "ca", now) if state.exists else None
        changes: list[tuple[str, str]] = []
        restored = False
        if signing is None and known is not None:
            # the state Secret is gone but this process holds the key that signed live certificates: write it back,
            # never mint a new CA under them
            signing, restored = known.ca, True
            changes.append(("CAStateRestored", f"Secret {self.namespace}/{state_name} was missing: restored CA "
                                               f"sha256:{signing.fingerprint[:16]} from memory"))
        elif signing is None:
            signing = brought or generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
            changes.append(("CAReady", f"{'loaded the brought' if brought else 'generated a'} CA "
                                       f"sha256:{signing.fingerprint[:16]}"))
        if changes:
            log.info("trust domain %s: %s", spec.name, changes[-1][1])
        if state.exists:
            revocations, number = _read_revocations(state)
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
                runtime.reported = _reported_from(runtime.last_status)
                runtime.identities = await self._identities_of(spec.name)
        runtime.spec = spec
        runtime.revocations, runtime.crl_number = revocations, max(number, runtime.crl_number)
        if state.exists:
            runtime.next_ca = _load_pair(state, "next", now)
            runtime.previous_ca = _load_pair(state, "previous", now)
            raw_rotation = state.data.get("rotation.json")
            runtime.rotation = RotationState.from_json(json.loads(raw_rotation)) if raw_rotation else RotationState()
        elif not restored:
            runtime.next_ca = runtime.previous_ca = None
            runtime.rotation = RotationState()
        request = (body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ROTATE_CA)
        replacement = brought is not None and brought.fingerprint not in {c.fingerprint for c in runtime.trusted}
        changes += self._advance(runtime, now, request, brought if replacement else None)
        if changes or not state.exists:
            # persisted before anything is signed with it: a CA whose key is lost would strand its certificates
            await self._save_state(runtime, state)
        try:
            runtime.federated_roots, runtime.federated_crls = await self._federated_bundles(spec, runtime)
            runtime.federation_problem = None
        except TrustDomainError as exc:
            # federation degrades (the last bundles read stay), local issuance goes on
            runtime.federation_problem = (exc.reason, exc.message)
        self._domains[spec.name] = runtime
        if runtime.crls_stale(now):
            if runtime.crl_signed is not None and runtime.crl_signed[1] == runtime.crl_inputs():
                runtime.crl_number += 1  # re-signed for age alone: still a new CRL, so a new number
                await self._save_state(runtime, await self.kube.run(self.kube.read_secret, self.namespace,
                                                                    state_name))
            runtime.sign_crls(now)
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
        return IdentitySet((str(b["metadata"]["namespace"]), str(b["metadata"]["name"])) for b in bodies
                           if ((b.get("spec") or {}).get("trustDomain")
                               or (b.get("status") or {}).get("trustDomain")) == name
                           and not b["metadata"].get("deletionTimestamp"))

    def _advance(self, runtime: TrustDomainRuntime, now: dt.datetime, request: str | None,
                 replacement: CertificateAuthority | None) -> list[tuple[str, str]]:
        """Move the CA rotation forward as far as the clock allows; returns (Event reason, message) per step."""
        spec, changes = runtime.spec, []
        for _ in range(3):
            step = next_rotation_step(runtime.rotation, now, runtime.ca.not_after, _rotate_before(runtime),
                                      spec.ca_propagation_delay, request, replacement is not None,
                                      can_generate=spec.ca_secret_ref is None)
            if step.action == "warn":
                runtime.warning = step.reason
                break
            runtime.warning = None
            if step.action == "start":
                runtime.next_ca = replacement or generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
                runtime.rotation = RotationState(PREPARING, now, None, request or runtime.rotation.last_request)
                replacement = None
                changes.append(("CARotationStarted",
                                f"{step.reason}: new CA sha256:{runtime.next_ca.fingerprint[:16]} added to every "
                                f"bundle; it signs after {spec.ca_propagation_delay.total_seconds():.0f} s"))
            elif step.action == "switch":
                assert runtime.next_ca is not None
                # the old CA's last leaf lives at most maxTTL from now; keep it trusted until then
                runtime.previous_ca, runtime.ca, runtime.next_ca = runtime.ca, runtime.next_ca, None
                retire = now + spec.policy.max_ttl + dt.timedelta(seconds=5)
                runtime.rotation = RotationState(ROTATING, now, retire, runtime.rotation.last_request)
                changes.append(("CARotated", f"signing switched to CA sha256:{runtime.ca.fingerprint[:16]}; "
                                             f"identities re-issue now; old CA trusted until {iso(retire)}"))
            elif step.action == "retire":
                old = runtime.previous_ca
                runtime.previous_ca = None
                runtime.rotation = RotationState(STABLE, now, None, runtime.rotation.last_request)
                changes.append(("CARetired", f"old CA sha256:{old.fingerprint[:16] if old else '-'} removed from "
                                             "every bundle"))
            else:
                break
            log.info("trust domain %s: %s", spec.name, changes[-1][1])
        return changes

    def next_phase_check(self, runtime: TrustDomainRuntime) -> dt.datetime | None:
        spec, now = runtime.spec, self.clock.now()
        step = next_rotation_step(runtime.rotation, now, runtime.ca.not_after, _rotate_before(runtime),
                                  spec.ca_propagation_delay, can_generate=spec.ca_secret_ref is None)
        # federated bundles live in objects we do not watch: look again periodically
        due = [now + self.resync]
        if step.next_check:
            due.append(step.next_check)
        if runtime.crl_signed is not None:
            due.append(crl_resign_at(runtime.crl_signed[0], spec.crl_validity))
        return min(due)

    async def _load_brought_ca(self, spec: TrustDomainSpec, now: dt.datetime) -> CertificateAuthority:
        ref = spec.ca_secret_ref
        assert ref is not None
        secret = await self.kube.run(self.kube.read_secret, self.namespace, ref)
        self.read_versions[(spec.name, ref)] = secret.resource_version if secret.exists else None
        if not secret.exists:
            raise TrustDomainError("CASecretMissing", f"spec.ca.secretRef: Secret {self.namespace}/{ref} not found")
        cert = secret.data.get("tls.crt") or secret.data.get("ca.crt")
        key = secret.data.get("tls.key") or secret.data.get("ca.key")
        if not cert or not key:
            raise TrustDomainError("CAInvalid", f"spec.ca.secretRef: Secret {ref} needs tls.crt and tls.key")
        try:
            ca = load_ca(cert, key, now, secret.data.get("chain.crt", b""))
            check_ca_can_sign_svids(ca, spec.name, spec.policy.max_ttl)
        except PKIError as exc:
            raise TrustDomainError("CAInvalid", f"spec.ca.secretRef {ref}: {exc}") from None
        return ca

    async def _federated_bundles(self, spec: TrustDomainSpec, runtime: TrustDomainRuntime) -> tuple[str, str]:
        """Roots and CRLs of the trust domains this one federates with, from the ConfigMaps or Secrets named.

        A sidecar checks revocation for every peer, so a federated peer's CRL must travel with its root; CRLs
        issued by our own CAs are left out (the federated bundle may carry an older copy of ours).
        """
        roots: list[str] = []
        crls: list[str] = []
        own = {ca.certificate.subject for ca in runtime.trusted}
        for i, fed in enumerate(spec.federates_with):
            ref = fed.get("configMapRef") or fed.get("secretRef")
            if not isinstance(ref, dict):
                continue
            key = ref.get("key") or "ca.crt"
            if fed.get("configMapRef"):
                cm = await self.kube.run(self.kube.read_configmap, ref["namespace"], ref["name"])
                data = dict((cm or {}).get("data", {}))
            else:
                secret = await self.kube.run(self.kube.read_secret, ref["namespace"], ref["name"])
                data = {k: v.decode(errors="replace") for k, v in secret.data.items()} if secret.exists else {}
            text = data.get(key)
            if not text or "BEGIN CERTIFICATE" not in text:
                raise TrustDomainError("FederationBundleMissing",
                                       f"spec.federatesWith[{i}]: no certificates under {key!r} in "
                                       f"{ref['namespace']}/{ref['name']}")
            roots.append(text if text.endswith("\n") else text + "\n")
            try:
                foreign = [c for c in load_crls(data.get("crl.pem", "").encode()) if c.issuer not in own]
            except PKIError:
                foreign = []
            crls.extend(c.public_bytes(Encoding.PEM).decode() for c in foreign)
        return "".join(roots), "".join(dict.fromkeys(crls))

    async def _save_state(self, runtime: TrustDomainRuntime, current: SecretSnapshot) -> None:
        data = {"revocations.json": json.dumps(_revocations_json(runtime)).encode(),
                "rotation.json": json.dumps(runtime.rotation.to_json()).encode()}
        for prefix, ca in (("ca", runtime.ca), ("next", runtime.next_ca), ("previous", runtime.previous_ca)):
            if ca is not None:
                data[f"{prefix}.crt"] = ca.certificate_pem()
                data[f"{prefix}.key"] = ca.key_pem()
                if ca.chain:
                    from meshtls.pki import certificates_pem

                    data[f"{prefix}-chain.crt"] = certificates_pem(list(ca.chain))
        labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRUST_DOMAIN: runtime.name}
        await self.kube.run(self.kube.write_opaque_secret, self.namespace, state_secret_name(runtime.name), data,
                            labels, current)

    # --- revocation, batched ---------------------------------------------------------------------------------

    async def revoke(self, runtime: TrustDomainRuntime, entries: list[RevokedCertificate]) -> None:
        """Put serials on the CRL and publish it everywhere; returns once every bundle carries it."""
        if not entries:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        runtime.pending.append((entries, future))
        if runtime.flusher is None or runtime.flusher.done():
            runtime.flusher = asyncio.create_task(self._flush(runtime))
        await future

    async def _flush(self, runtime: TrustDomainRuntime) -> None:
        await asyncio.sleep(BATCH_WINDOW)
        while runtime.pending:
            batch, runtime.pending = runtime.pending, []
            try:
                async with runtime.lock:
                    await self._persist_revocations(runtime, [e for entries, _ in batch for e in entries])
                await self.publish(runtime)
                await self.write_status(runtime)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _persist_revocations(self, runtime: TrustDomainRuntime, entries: list[RevokedCertificate]) -> None:
        for _attempt in range(5):
            now = self.clock.now()
            state = await self.kube.run(self.kube.read_secret, self.namespace, state_secret_name(runtime.name))
            # a deleted state Secret is written back from memory, revocations included
            stored, number = _read_revocations(state) if state.exists else (runtime.revocations, runtime.crl_number)
            known = {e.serial_number for e in stored}
            merged = drop_expired(stored + [e for e in entries if e.serial_number not in known], now)
            runtime.revocations, runtime.crl_number = merged, max(number, runtime.crl_number) + 1
            try:
                await self._save_state(runtime, state)
            except Conflict:
                continue
            runtime.sign_crls(now)
            metrics.revoked.labels(runtime.name).inc(len(entries))
            metrics.crl_entries.labels(runtime.name).set(len(merged))
            return
        raise Conflict(f"could not update {state_secret_name(runtime.name)} after 5 attempts")

    # --- bundles ---------------------------------------------------------------------------------------------

    async def bind(self, runtime: TrustDomainRuntime, key: Key) -> None:
        """The identity `key` is issued under `runtime`: its namespace's bundle carries that trust domain (and no
        longer the one it left, if no other identity there needs it)."""
        namespace = key[0]
        left = [r for r in self._domains.values() if r is not runtime and key in r.identities]
        for other in left:
            other.identities.discard(key)
        fresh = not runtime.active_in(namespace) or namespace not in runtime.namespaces
        runtime.identities.add(key)
        runtime.namespaces.add(namespace)
        if fresh or left:
            names = {runtime.spec.bundle_configmap} | {r.spec.bundle_configmap for r in left}
            await asyncio.gather(*(self.publish_bundle(namespace, name) for name in sorted(names)))
        elif (namespace, runtime.spec.bundle_configmap) not in self.published:
            await self.publish_bundle(namespace, runtime.spec.bundle_configmap)

    async def unbind(self, key: Key) -> None:
        """The identity is gone: its trust domain leaves the namespace's bundle if no other identity there needs
        it and another trust domain still publishes there."""
        names = set()
        for r in self._domains.values():
            if key in r.identities:
                r.identities.discard(key)
                names.add(r.spec.bundle_configmap)
        for name in sorted(names):
            await self.publish_bundle(key[0], name)

    async def withdraw(self, runtime: TrustDomainRuntime) -> None:
        """A deleted trust domain leaves every bundle it was merged into."""
        names = {runtime.spec.bundle_configmap} | runtime.bundle_names
        for ns in sorted(runtime.namespaces | runtime.selected):
            for name in sorted(names):
                await self.publish_bundle(ns, name)

    async def publish(self, runtime: TrustDomainRuntime, namespaces: list[str] | None = None) -> int:
        """Write the bundle ConfigMap of each namespace the trust domain serves; returns how many were written."""
        targets = set(namespaces) if namespaces is not None else set(runtime.namespaces)
        if namespaces is None:
            if runtime.spec.bundle_namespace_selector:
                selector = ",".join(f"{k}={v}" for k, v in runtime.spec.bundle_namespace_selector.items())
                runtime.selected = set(await self.kube.run(self.kube.list_namespaces, selector))
            else:
                runtime.selected = set()
            targets |= runtime.selected | set(runtime.identities.per_namespace)
        current = runtime.spec.bundle_configmap
        slots = asyncio.Semaphore(8)

        async def one(ns: str, name: str) -> bool:
            async with slots:
                return await self.publish_bundle(ns, name, drop_if_empty=name != current)

        renamed = sorted(runtime.bundle_names - {current})
        if renamed:  # the old name: merged without this trust domain, or removed when nothing else publishes there
            await asyncio.gather(*(one(ns, old) for ns in sorted(targets) for old in renamed))
        runtime.bundle_names = {current}
        written = sum(await asyncio.gather(*(one(ns, current) for ns in sorted(targets))))
        if written:
            metrics.crl_writes.labels(runtime.name).inc()
        return written

    def contributors(self, namespace: str, name: str) -> list[TrustDomainRuntime]:
        """The trust domains a bundle ConfigMap carries: those with an identity in (or selecting) the namespace;
        when none has, those that published there before (a namespace whose last identity left keeps its bundle
        and the CRL that revoked it)."""
        under_name = [r for r in self._domains.values() if r.spec.bundle_configmap == name]
        active = [r for r in under_name if r.active_in(namespace)]
        return active or [r for r in under_name if namespace in r.namespaces]

    def wanted_bundle(self, namespace: str, name: str) -> dict[str, str] | None:
        found = self.contributors(namespace, name)
        return merge_bundle([r.contribution() for r in found]) if found else None

    async def publish_bundle(self, namespace: str, name: str, drop_if_empty: bool = False) -> bool:
        """Bring one bundle ConfigMap to the merge of its trust domains; True when something was written."""
        key = (namespace, name)
        lock = self._bundle_locks.setdefault(key, asyncio.Lock())
        async with lock:
            found = self.contributors(namespace, name)
            if not found:
                self.published.pop(key, None)
                self.bundle_conflicts.pop(key, None)
                return await self._remove_bundle(namespace, name) if drop_if_empty else False
            contributions = [r.contribution() for r in found]
            data = merge_bundle(contributions)
            if self.published.get(key) == data:
                return False
            for r in found:
                r.namespaces.add(namespace)
            return await self._write_bundle(namespace, name, data, bundle_trust_domains(contributions))

    async def _remove_bundle(self, namespace: str, name: str) -> bool:
        current = await self.kube.run(self.kube.read_configmap, namespace, name)
        if current is None or current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
            return False
        try:
            await self.kube.run(self.kube.delete_configmap, namespace, name, current.get("uid"))
        except Exception as exc:
            log.warning("could not remove the bundle %s/%s: %s", namespace, name, exc)
            return False
        log.info("bundle %s/%s removed: no trust domain publishes under that name there any more", namespace, name)
        return True

    async def _write_bundle(self, namespace: str, name: str, data: dict[str, str], trust_domains: str) -> bool:
        key = (namespace, name)
        for _attempt in range(3):
            current = await self.kube.run(self.kube.read_configmap, namespace, name)
            if current is not None and current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
                if key not in self.bundle_conflicts:
                    log.warning("ConfigMap %s/%s exists and is not managed by meshtls: bundle not published there",
                                namespace, name)
                self.bundle_conflicts[key] = (f"ConfigMap {namespace}/{name} exists and is not managed by meshtls: "
                                              "the trust bundle is not published there")
                return False
            self.bundle_conflicts.pop(key, None)
            labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_BUNDLE: "true"}
            if "," not in trust_domains:
                labels[LABEL_TRUST_DOMAIN] = trust_domains  # a label holds one; the annotation names them all
            annotations = {ANNOTATION_TRUST_DOMAINS: trust_domains}
            if (current is not None and bundle_matches(current["data"], data)
                    and current.get("annotations", {}).get(ANNOTATION_TRUST_DOMAINS) == trust_domains):
                self.published[key] = data
                return False
            try:
                await self.kube.run(self.kube.write_configmap, namespace, name, data, labels, current,
                                    annotations=annotations)
            except Conflict:
                continue
            except Exception as exc:  # a namespace being deleted must not stop the others
                if not await self._namespace_alive(namespace):
                    return False
                log.warning("could not publish the bundle into %s: %s", namespace, exc)
                return False
            self.published[key] = data
            return True
        return False

    async def _namespace_alive(self, namespace: str) -> bool:
        """False (and the namespace forgotten) when it is gone or terminating: no bundle is owed there any more."""
        try:
            if await self.kube.run(self.kube.namespace_exists, namespace):
                return True
        except Exception:
            return True  # cannot tell: keep it, the next publish tries again
        log.info("namespace %s is gone or terminating: no bundle published there any more", namespace)
        for r in self._domains.values():
            r.namespaces.discard(namespace)
            r.selected.discard(namespace)
            for key in [k for k in r.identities if k[0] == namespace]:
                r.identities.discard(key)
        for key in [k for k in self.published if k[0] == namespace]:
            self.published.pop(key, None)
        return False

    def bundle_changed(self, namespace: str, name: str, data: dict[str, str] | None) -> bool:
        """A bundle ConfigMap was changed or deleted: True when it differs from what meshtls would write (it is
        then republished). Judged by content, so our own writes coming back cost nothing."""
        wanted = self.wanted_bundle(namespace, name)
        if wanted is None or bundle_matches(data, wanted):
            return False
        self.published.pop((namespace, name), None)
        return True

    def conflicts_of(self, runtime: TrustDomainRuntime) -> list[str]:
        name = runtime.spec.bundle_configmap
        return [message for (ns, cm), message in sorted(self.bundle_conflicts.items())
                if cm == name and (runtime.active_in(ns) or ns in runtime.namespaces)]

    # --- status ----------------------------------------------------------------------------------------------

    def status_of(self, runtime: TrustDomainRuntime) -> dict[str, Any]:
        now = self.clock.now()
        rotation: dict[str, Any] = {"phase": runtime.rotation.phase,
                                    "since": iso(runtime.rotation.since) if runtime.rotation.since else None,
                                    "signingFingerprint": runtime.ca.fingerprint,
                                    "nextFingerprint": runtime.next_ca.fingerprint if runtime.next_ca else None,
                                    "previousFingerprint": runtime.previous_ca.fingerprint
                                    if runtime.previous_ca else None,
                                    "retireAfter": iso(runtime.rotation.retire_after)
                                    if runtime.rotation.retire_after else None,
                                    "lastRequest": runtime.rotation.last_request}
        signing = f"signing with CA sha256:{runtime.ca.fingerprint[:16]} until {iso(runtime.ca.not_after)}"
        problems = self.problems_of(runtime)
        if problems:  # Ready is everything the spec asks for; Issuing says the CA signs regardless
            ready = condition("Ready", False, problems[0][1], f"{problems[0][2]} (local issuance continues)", now)
        else:
            ready = condition("Ready", True, "CAReady", signing, now)
        conditions = [ready, condition("Issuing", True, "CAReady", signing, now),
                      condition("CAExpiring", runtime.warning is not None,
                                "CAInRotationWindow" if runtime.warning else "CAValid",
                                runtime.warning or "outside its rotation window", now)]
        if runtime.spec.federates_with:
            fed = runtime.federation_problem
            conditions.append(condition("Federated", fed is None, fed[0] if fed else "FederationBundlesLoaded",
                                        fed[1] if fed else f"{len(runtime.spec.federates_with)} federated bundle(s) "
                                                           "in every bundle", now))
        conflicts = self.conflicts_of(runtime)
        conditions.append(condition("BundlePublished", not conflicts, "BundleConflict" if conflicts else "Published",
                                    "; ".join(conflicts[:5]) + (f" (and {len(conflicts) - 5} more)"
                                                                if len(conflicts) > 5 else "")
                                    if conflicts else f"bundle ConfigMap {runtime.spec.bundle_configmap} published",
                                    now))
        if self.defaults.get(runtime.name):
            clash = self.default_conflict()
            conditions.append(condition(
                "DefaultTrustDomain", not clash, "MultipleDefaults" if clash else "Default",
                f"TrustDomains {', '.join(clash)} are all marked default: identities without spec.trustDomain and "
                "not yet issued get none" if clash else "identities without spec.trustDomain are issued here", now))
        return {"caFingerprint": runtime.ca.fingerprint, "caNotAfter": iso(runtime.ca.not_after),
                "crlNumber": runtime.crl_number, "crlEntries": len(drop_expired(runtime.revocations, now)),
                "rotation": rotation, "conditions": conditions}

    def problems_of(self, runtime: TrustDomainRuntime) -> list[tuple[str, str, str]]:
        """(condition type, reason, message) of each thing that does not work although the CA signs."""
        out = []
        if runtime.federation_problem:
            out.append(("Federated", *runtime.federation_problem))
        conflicts = self.conflicts_of(runtime)
        if conflicts:
            out.append(("BundlePublished", "BundleConflict", "; ".join(conflicts[:5])))
        if self.defaults.get(runtime.name) and self.default_conflict():
            out.append(("DefaultTrustDomain", "MultipleDefaults",
                        f"TrustDomains {', '.join(self.default_conflict())} are all marked default"))
        return out

    def new_problems(self, runtime: TrustDomainRuntime) -> list[tuple[str, str]]:
        """(reason, message) of problems not reported yet: one Warning Event per change, not per look."""
        current = {kind: (reason, message) for kind, reason, message in self.problems_of(runtime)}
        fresh = [problem for kind, problem in current.items() if runtime.reported.get(kind) != problem]
        runtime.reported = current
        return fresh

    async def write_status(self, runtime: TrustDomainRuntime) -> bool:
        """Patch the status only when it changes; lastTransitionTime moves only on a transition."""
        patch = status_patch(runtime.last_status, self.status_of(runtime))
        if patch is None:
            return False
        try:
            await self.kube.run(self.kube.patch_trust_domain_status, runtime.name, patch)
        except NotFound:
            return False  # deleted meanwhile
        runtime.last_status = {**(runtime.last_status or {}), **patch}
        return True

    def failed_status(self, old: dict[str, Any], reason: str, message: str) -> dict[str, Any] | None:
        """The status of an unusable trust domain, or None when it already says so."""
        now = self.clock.now()
        conditions = with_condition(old, condition("Issuing", False, reason, message, now))
        conditions = with_condition({"conditions": conditions}, condition("Ready", False, reason, message, now))
        return status_patch(old, {"conditions": conditions})


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


def _reported_from(status: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Problems a previous run already reported (its conditions say so): not Evented again after a restart."""
    out = {}
    for c in (status or {}).get("conditions") or []:
        if c.get("type") in ("Federated", "BundlePublished", "DefaultTrustDomain") and c.get("status") == "False":
            message = str(c.get("message"))
            if c.get("type") == "BundlePublished":
                message = message.split(" (and ")[0]
            out[str(c["type"])] = (str(c.get("reason")), message)
    return out


def _read_revocations(state: SecretSnapshot) -> tuple[list[RevokedCertificate], int]:
    raw = state.data.get("revocations.json") if state.exists else None
    if not raw:
        return [], 1
    doc = json.loads(raw)
    entries = [
        RevokedCertificate(
            int(e["serial"], 16),
            dt.datetime.fromisoformat(e["revokedAt"]),
            dt.datetime.fromisoformat(e["notAfter"]),
            RevocationReason.parse(e.get("reason", "unspecified")),
        )
        for e in doc.get("entries", [])
    ]
    return entries, int(doc.get("crlNumber", 1))


def _revocations_json(runtime: TrustDomainRuntime) -> dict[str, Any]:
    return {
        "crlNumber": runtime.crl_number,
        "entries": [
            {"serial": format(e.serial_number, "x"), "revokedAt": e.revoked_at.isoformat(),
             "notAfter": e.not_after.isoformat(), "reason": e.reason.value}
            for e in runtime.revocations
        ],
    }
