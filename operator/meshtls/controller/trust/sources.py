"""What a trust domain reads beside its own state: a brought CA (`spec.ca.secretRef`) and the bundles of the trust
domains it federates with (`spec.federatesWith`)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.serialization import Encoding

from meshtls.api.model import TrustDomainSpec
from meshtls.api.reasons import Reason
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.pki import CertificateAuthority, PKIError, check_ca_can_sign_svids, load_ca, load_crls

if TYPE_CHECKING:
    from meshtls.controller.trust.registry import TrustDomains


async def load_brought_ca(trust: TrustDomains, spec: TrustDomainSpec, now: dt.datetime) -> CertificateAuthority:
    ref = spec.ca_secret_ref
    assert ref is not None
    secret = await trust.kube.run(trust.kube.read_secret, trust.namespace, ref)
    trust.read_versions[(spec.name, ref)] = secret.resource_version if secret.exists else None
    if not secret.exists:
        raise TrustDomainError(Reason.CA_SECRET_MISSING,
                               f"spec.ca.secretRef: Secret {trust.namespace}/{ref} not found")
    cert = secret.data.get("tls.crt") or secret.data.get("ca.crt")
    key = secret.data.get("tls.key") or secret.data.get("ca.key")
    if not cert or not key:
        raise TrustDomainError(Reason.CA_INVALID, f"spec.ca.secretRef: Secret {ref} needs tls.crt and tls.key")
    try:
        ca = load_ca(cert, key, now, secret.data.get("chain.crt", b""))
        check_ca_can_sign_svids(ca, spec.name, spec.policy.max_ttl)
    except PKIError as exc:
        raise TrustDomainError(Reason.CA_INVALID, f"spec.ca.secretRef {ref}: {exc}") from None
    return ca


async def federated_bundles(trust: TrustDomains, spec: TrustDomainSpec, runtime: TrustDomainRuntime) -> tuple[str, str]:
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
            cm = await trust.kube.run(trust.kube.read_configmap, ref["namespace"], ref["name"])
            data = dict((cm or {}).get("data", {}))
        else:
            secret = await trust.kube.run(trust.kube.read_secret, ref["namespace"], ref["name"])
            data = {k: v.decode(errors="replace") for k, v in secret.data.items()} if secret.exists else {}
        text = data.get(key)
        if not text or "BEGIN CERTIFICATE" not in text:
            raise TrustDomainError(Reason.FEDERATION_BUNDLE_MISSING,
                                   f"spec.federatesWith[{i}]: no certificates under {key!r} in "
                                   f"{ref['namespace']}/{ref['name']}")
        roots.append(text if text.endswith("\n") else text + "\n")
        try:
            foreign = [c for c in load_crls(data.get("crl.pem", "").encode()) if c.issuer not in own]
        except PKIError:
            foreign = []
        crls.extend(c.public_bytes(Encoding.PEM).decode() for c in foreign)
    return "".join(roots), "".join(dict.fromkeys(crls))
