"""A trust domain at run time: its CAs (signing, next, previous), revocations and CRLs, the namespaces and
identities it serves; and the error an unusable one raises."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshtls.api.model import TrustDomainSpec
from meshtls.controller.scheduler import IdentityKey
from meshtls.pki import CertificateAuthority, RevokedCertificate
from meshtls.policy.ca_rotation import RotationState
from meshtls.policy.trust_policy import BundleContribution, merge_bundle

BundleKey = tuple[str, str]  # (namespace, ConfigMap name)
Key = IdentityKey  # an identity a trust domain issued under (or waits for)


class IdentitySet(set[IdentityKey]):
    """The identities issued under a trust domain, counted per namespace: "has it any there?" is asked at every
    reconcile, and must not cost a scan of ten thousand entries."""

    def __init__(self, keys: Iterable[IdentityKey] = ()) -> None:
        super().__init__()
        self.per_namespace: Counter[str] = Counter()
        for key in keys:
            self.add(key)

    def add(self, key: IdentityKey) -> None:
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
