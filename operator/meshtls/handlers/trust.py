"""Trust domains at run time: the signing CA, its revocations and CRL, and the bundles published from them.

State lives in one Secret per trust domain in the operator's namespace (`meshtls-ca-<trust domain>`): the
generated CA's key (never anywhere else), the revocation entries and the CRL number. Revocations are batched:
a burst of deletions costs one CRL signing and one ConfigMap write per namespace, not one per deletion.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any

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
from meshtls.lifecycle.clock import Clock
from meshtls.lifecycle.issuance import condition, iso, merge_conditions
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
)

log = logging.getLogger("meshtls.trust")
BATCH_WINDOW = 0.25  # seconds a revocation waits for others to share its CRL signing


def state_secret_name(trust_domain: str) -> str:
    return f"meshtls-ca-{trust_domain.replace('_', '-')}"[:253].rstrip(".-")


def _ski(ca: CertificateAuthority) -> bytes:
    return ca.authority_key_identifier.key_identifier or b""


@dataclass
class TrustDomainRuntime:
    spec: TrustDomainSpec
    ca: CertificateAuthority
    revocations: list[RevokedCertificate]
    crl_number: int
    crl: bytes = b""
    namespaces: set[str] = field(default_factory=set)
    published: dict[str, tuple[str, str]] = field(default_factory=dict)  # namespace -> (ca, crl) last written
    pending: list[tuple[list[RevokedCertificate], asyncio.Future[None]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ca_key_id(self) -> bytes:
        return _ski(self.ca)

    def bundle_data(self) -> dict[str, str]:
        return {"ca.crt": self.ca.roots_pem.decode(), "crl.pem": self.crl.decode()}


class TrustDomainError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


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
            return await self._load(body)

    async def ensure(self, body: dict[str, Any]) -> TrustDomainRuntime:
        """Create or reload a trust domain from its resource (on create, update and operator start)."""
        async with self._load_lock:
            return await self._load(body)

    async def _load(self, body: dict[str, Any]) -> TrustDomainRuntime:
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
        if spec.ca_secret_ref:
            ca = await self._load_brought_ca(spec, now)
        elif state.exists and state.data.get("ca.crt") and state.data.get("ca.key"):
            try:
                ca = load_ca(state.data["ca.crt"], state.data["ca.key"], now)
            except PKIError as exc:
                raise TrustDomainError("CAInvalid", f"the generated CA in {state_name} is unusable: {exc}") from None
        else:
            ca = generate_ca(spec.name, now, spec.ca_validity, spec.ca_key_algorithm)
            log.info("generated a CA for trust domain %s (sha256 %s)", spec.name, ca.fingerprint[:16])
        revocations, number = _read_revocations(state)
        runtime = self._domains.get(spec.name)
        if runtime is not None and runtime.ca.fingerprint == ca.fingerprint:
            runtime.spec = spec
        else:
            runtime = TrustDomainRuntime(spec, ca, revocations, number)
            if runtime.name in self._domains:
                runtime.namespaces = self._domains[runtime.name].namespaces
            self._domains[spec.name] = runtime
        if not state.exists or (not spec.ca_secret_ref and state.data.get("ca.crt") != ca.certificate_pem()):
            await self._save_state(runtime, state)
        runtime.crl = crl_pem(build_crl(runtime.ca, runtime.revocations, runtime.crl_number, now,
                                        spec.crl_validity))
        metrics.ca_expiration.labels(spec.name).set(ca.not_after.timestamp())
        metrics.crl_entries.labels(spec.name).set(len(drop_expired(runtime.revocations, now)))
        return runtime

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

    async def _save_state(self, runtime: TrustDomainRuntime, current: SecretSnapshot) -> None:
        data = {"revocations.json": json.dumps(_revocations_json(runtime)).encode()}
        if not runtime.spec.ca_secret_ref:  # a brought CA's key stays in the user's Secret only
            data["ca.crt"] = runtime.ca.certificate_pem()
            data["ca.key"] = runtime.ca.key_pem()
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
            runtime.crl = crl_pem(build_crl(runtime.ca, merged, runtime.crl_number, now, runtime.spec.crl_validity))
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
        status: dict[str, Any] = {
            "caFingerprint": runtime.ca.fingerprint,
            "caNotAfter": iso(runtime.ca.not_after),
            "crlNumber": runtime.crl_number,
            "crlEntries": len(drop_expired(runtime.revocations, now)),
            "conditions": [condition("Ready", True, "CAReady",
                                     f"signing with CA sha256:{runtime.ca.fingerprint[:16]} until "
                                     f"{iso(runtime.ca.not_after)}", now)],
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
