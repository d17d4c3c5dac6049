"""Trust domains at run time: the CAs (signing, next, previous), revocations and CRLs, and the bundles from them.

State lives in one Secret per trust domain in the operator's namespace (`meshtls-ca-<trust domain>`): the signing
CA's key (never anywhere else), the next or previous CA during a rotation, the rotation phase, the revocation
entries and the CRL number. Revocations are batched: a burst of deletions costs one CRL signing and one ConfigMap
write per namespace, not one per deletion.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from meshtls.api.constants import (
    LABEL_BUNDLE,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
)
from meshtls.api.model import SpecError, TrustDomainSpec, parse_trust_domain
from meshtls.api.objects import SecretSnapshot
from meshtls.handlers import metrics
from meshtls.kube import Conflict, Kube
from meshtls.pki import (
    CertificateAuthority,
    PKIError,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    crl_pem,
    drop_expired,
    generate_ca,
    load_ca,
    load_crls,
)
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE, RotationState, next_rotation_step
from meshtls.policy.clock import Clock
from meshtls.policy.issuance import condition, iso, merge_conditions

log = logging.getLogger("meshtls.trust")
BATCH_WINDOW = 0.25  # seconds a revocation waits for others to share its CRL signing
RESYNC = dt.timedelta(seconds=30)
ANNOTATION_ROTATE_CA = "meshtls.dev/rotate-ca"  # set by `meshtls ca rotate`: start a CA rotation now


def state_secret_name(trust_domain: str) -> str:
    return f"meshtls-ca-{trust_domain.replace('_', '-')}"[:253].rstrip(".-")


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
    crl: bytes = b""
    crl_signed: tuple[dt.datetime, tuple[object, ...]] | None = None
    namespaces: set[str] = field(default_factory=set)
    identities: set[tuple[str, str]] = field(default_factory=set)
    published: dict[str, tuple[str, str]] = field(default_factory=dict)  # namespace -> (ca, crl) last written
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
                or now - signed[0] >= self.spec.crl_validity / 2)

    def crl_inputs(self) -> tuple[object, ...]:
        return (self.crl_number, tuple(sorted(e.serial_number for e in self.revocations)),
                tuple(ca.fingerprint for ca in self.trusted))

    def sign_crls(self, now: dt.datetime) -> None:
        # One CRL per trusted CA: a sidecar checking a leaf needs the CRL of that leaf's issuer.
        self.crl_signed = (now, self.crl_inputs())
        self.crl = b"".join(crl_pem(build_crl(ca, self.revocations, self.crl_number, now, self.spec.crl_validity))
                            for ca in self.trusted)

    def bundle_data(self) -> dict[str, str]:
        pems = "".join(ca.roots_pem.decode() for ca in self.trusted) + self.federated_roots
        return {"ca.crt": _unique_pem_blocks(pems), "crl.pem": self.crl.decode() + self.federated_crls}


def _unique_pem_blocks(text: str) -> str:
    """Each certificate once, in order: federated bundles may already carry ours."""
    end = "-----END CERTIFICATE-----"
    blocks: list[str] = []
    for chunk in text.split(end)[:-1]:
        block = chunk[chunk.index("-----BEGIN"):] + end + "\n"
        if block not in blocks:
            blocks.append(block)
    return "".join(blocks)


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


class TrustDomains:
    """The trust domains this operator signs for, loaded on demand and kept in memory."""

    def __init__(self, kube: Kube, clock: Clock, operator_namespace: str) -> None:
        self.kube = kube
        self.clock = clock
        self.namespace = operator_namespace
        self._domains: dict[str, TrustDomainRuntime] = {}
        self._load_lock = asyncio.Lock()

    def loaded(self) -> list[TrustDomainRuntime]:
        return list(self._domains.values())

    def forget(self, name: str) -> None:
        self._domains.pop(name, None)

    async def get(self, name: str | None) -> TrustDomainRuntime:
        """The runtime for `name`, or the only trust domain when `name` is None."""
        if name and name in self._domains:
            return self._domains[name]
        async with self._load_lock:
            if name is None:
                bodies = await self.kube.run(self.kube.list_trust_domains)
                if len(bodies) != 1:
                    raise TrustDomainError("UnknownTrustDomain",
                                           f"spec.trustDomain is required: the cluster has {len(bodies)} TrustDomains")
                body = bodies[0]
                name = str(body["metadata"]["name"])
                if name in self._domains:
                    return self._domains[name]
            else:
                if name in self._domains:
                    return self._domains[name]
                maybe = await self.kube.run(self.kube.get_trust_domain, name)
                if maybe is None:
                    raise TrustDomainError("UnknownTrustDomain", f"TrustDomain {name!r} does not exist")
                body = maybe
            runtime, _ = await self._load(body)
            return runtime

    async def ensure(self, body: dict[str, Any]) -> tuple[TrustDomainRuntime, list[tuple[str, str]]]:
        """Create or reload a trust domain (on create, update and operator start); returns the phase changes made."""
        async with self._load_lock:
            return await self._load(body)

    async def _load(self, body: dict[str, Any]) -> tuple[TrustDomainRuntime, list[tuple[str, str]]]:
        try:
            spec = parse_trust_domain(body)
        except SpecError as exc:
            raise TrustDomainError(exc.reason, str(exc)) from None
        now = self.clock.now()
        state_name = state_secret_name(spec.name)
        state = await self.kube.run(self.kube.read_secret, self.namespace, state_name)
        if state.exists and not state.managed:
            raise TrustDomainError("StateSecretConflict",
                                   f"Secret {self.namespace}/{state_name} exists and is not managed by meshtls")
        brought = await self._load_brought_ca(spec, now) if spec.ca_secret_ref else None
        signing = _load_pair(state, "ca", now) if state.exists else None
        changes: list[tuple[str, str]] = []
        if signing is None:
            signing = brought or generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
            changes.append(("CAReady", f"{'loaded the brought' if brought else 'generated a'} CA "
                                       f"sha256:{signing.fingerprint[:16]}"))
            log.info("trust domain %s: %s", spec.name, changes[-1][1])
        revocations, number = _read_revocations(state)
        runtime = self._domains.get(spec.name)
        if runtime is None or runtime.ca.fingerprint != signing.fingerprint:
            previous = runtime
            runtime = TrustDomainRuntime(spec, signing, revocations, number)
            if previous is not None:
                runtime.namespaces, runtime.identities = previous.namespaces, previous.identities
            self._domains[spec.name] = runtime
        runtime.spec = spec
        runtime.revocations, runtime.crl_number = revocations, max(number, runtime.crl_number)
        runtime.next_ca = _load_pair(state, "next", now) if state.exists else None
        runtime.previous_ca = _load_pair(state, "previous", now) if state.exists else None
        raw_rotation = state.data.get("rotation.json") if state.exists else None
        runtime.rotation = RotationState.from_json(json.loads(raw_rotation)) if raw_rotation else RotationState()
        runtime.federated_roots, runtime.federated_crls = await self._federated_bundles(spec, runtime)
        request = (body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_ROTATE_CA)
        replacement = brought is not None and brought.fingerprint not in {c.fingerprint for c in runtime.trusted}
        changes += self._advance(runtime, now, request, brought if replacement else None)
        if changes or not state.exists:
            await self._save_state(runtime, state)
        if runtime.crls_stale(now):
            if runtime.crl_signed is not None and runtime.crl_signed[1] == runtime.crl_inputs():
                runtime.crl_number += 1  # re-signed for age alone: still a new CRL, so a new number
                await self._save_state(runtime, await self.kube.run(self.kube.read_secret, self.namespace,
                                                                    state_name))
            runtime.sign_crls(now)
        metrics.ca_expiration.labels(spec.name).set(runtime.ca.not_after.timestamp())
        metrics.crl_entries.labels(spec.name).set(len(drop_expired(runtime.revocations, now)))
        return runtime, changes

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
        spec = runtime.spec
        step = next_rotation_step(runtime.rotation, self.clock.now(), runtime.ca.not_after, _rotate_before(runtime),
                                  spec.ca_propagation_delay, can_generate=spec.ca_secret_ref is None)
        # brought CAs and federated bundles live in objects we do not watch: look again periodically
        resync = self.clock.now() + RESYNC
        return min(step.next_check, resync) if step.next_check else resync

    async def advance(self, name: str) -> tuple[TrustDomainRuntime, list[tuple[str, str]]] | None:
        """Re-evaluate a trust domain's rotation from its resource (the phase timer calls this)."""
        body = await self.kube.run(self.kube.get_trust_domain, name)
        if body is None:
            self.forget(name)
            return None
        return await self.ensure(body)

    async def _load_brought_ca(self, spec: TrustDomainSpec, now: dt.datetime) -> CertificateAuthority:
        ref = spec.ca_secret_ref
        assert ref is not None
        secret = await self.kube.run(self.kube.read_secret, self.namespace, ref)
        if not secret.exists:
            raise TrustDomainError("CASecretMissing", f"spec.ca.secretRef: Secret {self.namespace}/{ref} not found")
        cert = secret.data.get("tls.crt") or secret.data.get("ca.crt")
        key = secret.data.get("tls.key") or secret.data.get("ca.key")
        if not cert or not key:
            raise TrustDomainError("CAInvalid", f"spec.ca.secretRef: Secret {ref} needs tls.crt and tls.key")
        try:
            return load_ca(cert, key, now, secret.data.get("chain.crt", b""))
        except PKIError as exc:
            raise TrustDomainError("CAInvalid", f"spec.ca.secretRef {ref}: {exc}") from None

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
                await self.kube.run(self.kube.patch_trust_domain_status, runtime.name, self.status_of(runtime))
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
            stored, number = _read_revocations(state)
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

    async def add_namespace(self, runtime: TrustDomainRuntime, namespace: str) -> None:
        """A namespace with an identity gets the bundle before the identity's Secret exists."""
        if namespace not in runtime.namespaces:
            runtime.namespaces.add(namespace)
            await self.publish(runtime, [namespace])

    async def publish(self, runtime: TrustDomainRuntime, namespaces: list[str] | None = None) -> int:
        """Write ca.crt and crl.pem into the bundle ConfigMap of each namespace; returns how many were written."""
        targets = set(namespaces) if namespaces is not None else set(runtime.namespaces)
        if namespaces is None and runtime.spec.bundle_namespace_selector:
            selector = ",".join(f"{k}={v}" for k, v in runtime.spec.bundle_namespace_selector.items())
            targets |= set(await self.kube.run(self.kube.list_namespaces, selector))
        data = runtime.bundle_data()
        wanted = (data["ca.crt"], data["crl.pem"])
        slots = asyncio.Semaphore(8)

        async def one(ns: str) -> bool:
            if runtime.published.get(ns) == wanted:
                return False
            async with slots:
                return await self._write_bundle(runtime, ns, data, wanted)

        written = sum(await asyncio.gather(*(one(ns) for ns in sorted(targets))))
        if written:
            metrics.crl_writes.labels(runtime.name).inc()
        return written

    async def _write_bundle(self, runtime: TrustDomainRuntime, namespace: str, data: dict[str, str],
                            wanted: tuple[str, str]) -> bool:
        name = runtime.spec.bundle_configmap
        for _attempt in range(3):
            current = await self.kube.run(self.kube.read_configmap, namespace, name)
            if current is not None and current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
                log.warning("ConfigMap %s/%s exists and is not managed by meshtls: bundle not published there",
                            namespace, name)
                return False
            if current is not None and current["data"] == data:
                runtime.published[namespace] = wanted
                return False
            labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRUST_DOMAIN: runtime.name, LABEL_BUNDLE: "true"}
            try:
                await self.kube.run(self.kube.write_configmap, namespace, name, data, labels, current)
            except Conflict:
                continue
            except Exception as exc:  # a namespace being deleted must not stop the others
                log.warning("could not publish the bundle into %s: %s", namespace, exc)
                return False
            runtime.published[namespace] = wanted
            return True
        return False

    def status_of(self, runtime: TrustDomainRuntime, identities: int | None = None) -> dict[str, Any]:
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
        status: dict[str, Any] = {
            "caFingerprint": runtime.ca.fingerprint,
            "caNotAfter": iso(runtime.ca.not_after),
            "crlNumber": runtime.crl_number,
            "crlEntries": len(drop_expired(runtime.revocations, now)),
            "rotation": rotation,
            "conditions": [condition("Ready", True, "CAReady",
                                     f"signing with CA sha256:{runtime.ca.fingerprint[:16]} until "
                                     f"{iso(runtime.ca.not_after)}", now),
                           condition("CAExpiring", runtime.warning is not None,
                                     "CAInRotationWindow" if runtime.warning else "CAValid",
                                     runtime.warning or "outside its rotation window", now)],
        }
        if identities is not None:
            status["identities"] = identities
        return status

    def failed_status(self, old: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
        return {"conditions": merge_conditions(old.get("conditions"),
                                               [condition("Ready", False, reason, message, self.clock.now())])}


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
