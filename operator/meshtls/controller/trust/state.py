"""The CA state Secret `meshtls-ca-<trust domain>` in the operator's namespace: the signing CA's key (never
anywhere else), the next or previous CA during a rotation, the rotation phase, the revocation entries and the CRL
number. Read and written here only."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from meshtls.api.constants import LABEL_MANAGED_BY, LABEL_TRUST_DOMAIN, MANAGED_BY
from meshtls.api.names import state_secret_name
from meshtls.api.objects import SecretSnapshot
from meshtls.api.reasons import Reason
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.kube import Kube
from meshtls.pki import (
    CertificateAuthority,
    PKIError,
    RevocationReason,
    RevokedCertificate,
    load_ca,
)


def load_pair(state: SecretSnapshot, prefix: str, now: dt.datetime) -> CertificateAuthority | None:
    cert, key = state.data.get(f"{prefix}.crt"), state.data.get(f"{prefix}.key")
    if not cert or not key:
        return None
    try:
        return load_ca(cert, key, now, state.data.get(f"{prefix}-chain.crt", b""))
    except PKIError as exc:
        if prefix == "previous":  # an expired previous CA simply retires
            return None
        raise TrustDomainError(Reason.CA_INVALID, f"the CA in the state Secret ({prefix}) is unusable: {exc}") from None


def read_revocations(state: SecretSnapshot) -> tuple[list[RevokedCertificate], int]:
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


def revocations_json(runtime: TrustDomainRuntime) -> dict[str, Any]:
    return {
        "crlNumber": runtime.crl_number,
        "entries": [
            {"serial": format(e.serial_number, "x"), "revokedAt": e.revoked_at.isoformat(),
             "notAfter": e.not_after.isoformat(), "reason": e.reason.value}
            for e in runtime.revocations
        ],
    }


async def save_state(kube: Kube, namespace: str, runtime: TrustDomainRuntime, current: SecretSnapshot) -> None:
    """Persisted before anything is signed with it: a CA whose key is lost would strand its certificates."""
    data = {"revocations.json": json.dumps(revocations_json(runtime)).encode(),
            "rotation.json": json.dumps(runtime.rotation.to_json()).encode()}
    for prefix, ca in (("ca", runtime.ca), ("next", runtime.next_ca), ("previous", runtime.previous_ca)):
        if ca is not None:
            data[f"{prefix}.crt"] = ca.certificate_pem()
            data[f"{prefix}.key"] = ca.key_pem()
            if ca.chain:
                from meshtls.pki import certificates_pem

                data[f"{prefix}-chain.crt"] = certificates_pem(list(ca.chain))
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_TRUST_DOMAIN: runtime.name}
    await kube.run_first(kube.write_opaque_secret, namespace, state_secret_name(runtime.name), data,
                         labels, current)
