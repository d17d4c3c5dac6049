"""What an issuance produces for the API: the Secret's content and the identity's status, derived in one place."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from meshtls.api.constants import (
    ANNOTATION_NOT_AFTER,
    ANNOTATION_OWNER_UID,
    ANNOTATION_SERIAL,
    ANNOTATION_SPIFFE_ID,
    LABEL_IDENTITY,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
)
from meshtls.api.model import EffectiveIdentity
from meshtls.lifecycle.renewal import renewal_time
from meshtls.lifecycle.triggers import ANNOTATION_ISSUED_AT, ANNOTATION_RENEWAL_TIME
from meshtls.pki import CertificateAuthority, IssuedCertificate, issue_svid

# Serials revoked on deletion: every certificate of the identity that has not yet expired.
MAX_TRACKED_SERIALS = 64


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Issuance:
    certificate: IssuedCertificate
    renewal_time: dt.datetime
    issued_at: dt.datetime

    @property
    def serial(self) -> str:
        return self.certificate.serial_hex


def issue_for(identity: EffectiveIdentity, ca: CertificateAuthority, now: dt.datetime,
              on_schedule: bool = True) -> Issuance:
    cert = issue_svid(ca, identity.spiffe_id, now, identity.ttl, identity.spec.dns_names, identity.key_algorithm,
                      backdate=identity.backdate)
    due = renewal_time(now, cert.not_after, identity.renew_at_fraction, identity.renew_before, seed=cert.serial_hex,
                       on_schedule=on_schedule)
    return Issuance(cert, due, now)


def secret_body(identity: EffectiveIdentity, issuance: Issuance, owner: dict[str, Any]) -> dict[str, Any]:
    """The kubernetes.io/tls Secret, owned by its WorkloadIdentity (garbage-collected with it)."""
    cert = issuance.certificate
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": identity.spec.secret_name,
            "namespace": identity.spec.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_IDENTITY: identity.spec.name,
                LABEL_TRUST_DOMAIN: identity.trust_domain,
            },
            "annotations": {
                ANNOTATION_SPIFFE_ID: str(identity.spiffe_id),
                ANNOTATION_SERIAL: cert.serial_hex,
                ANNOTATION_NOT_AFTER: iso(cert.not_after),
                ANNOTATION_ISSUED_AT: issuance.issued_at.isoformat(),
                ANNOTATION_RENEWAL_TIME: issuance.renewal_time.isoformat(),
                ANNOTATION_OWNER_UID: owner["uid"],
            },
            "ownerReferences": [{
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["name"],
                "uid": owner["uid"],
                "controller": True,
                "blockOwnerDeletion": False,
            }],
        },
        "stringData": {
            "tls.crt": cert.cert_chain_pem.decode(),
            "tls.key": cert.key_pem.decode(),
            "ca.crt": cert.ca_pem.decode(),
        },
    }


def tracked_serials(
    previous: list[dict[str, str]] | None, new: Issuance | None, now: dt.datetime
) -> list[dict[str, str]]:
    """Serials still valid (revoked on deletion); expired ones drop off, the list stays short."""
    kept = [e for e in previous or [] if dt.datetime.fromisoformat(e["notAfter"].replace("Z", "+00:00")) > now]
    if new is not None:
        kept.append({"serial": new.serial, "notAfter": iso(new.certificate.not_after)})
    return kept[-MAX_TRACKED_SERIALS:]


def condition(type_: str, status: bool, reason: str, message: str, now: dt.datetime) -> dict[str, str]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": iso(now)}


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Replace conditions by type; keep lastTransitionTime when the status did not change."""
    by_type = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = by_type.pop(c["type"], None)
        if prev and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        out.append(c)
    out.extend(by_type.values())
    return out


def issued_status(identity: EffectiveIdentity, issuance: Issuance, old_status: dict[str, Any], rotated: bool,
                  ca_fingerprint: str, renew_request: str | None, now: dt.datetime) -> dict[str, Any]:
    cert = issuance.certificate
    rotations = int(old_status.get("rotations") or 0) + (1 if rotated else 0)
    status: dict[str, Any] = {
        "spiffeID": str(identity.spiffe_id),
        "trustDomain": identity.trust_domain,
        "secretName": identity.spec.secret_name,
        "serialNumber": cert.serial_hex,
        "notBefore": iso(cert.not_before),
        "notAfter": iso(cert.not_after),
        "renewalTime": iso(issuance.renewal_time),
        "keyAlgorithm": identity.key_algorithm.value,
        "caFingerprint": ca_fingerprint,
        "rotations": rotations,
        "activeSerials": tracked_serials(old_status.get("activeSerials"), issuance, now),
        "conditions": merge_conditions(old_status.get("conditions"), [
            condition("Ready", True, "Issued", f"certificate {cert.serial_hex} valid until {iso(cert.not_after)}", now),
            condition("Issuing", False, "Issued", "certificate is up to date", now),
        ]),
    }
    if rotated:
        status["lastRotationTime"] = iso(now)
    if renew_request:
        status["lastRenewRequest"] = renew_request
    return status


def failed_status(old_status: dict[str, Any], reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
    return {"conditions": merge_conditions(old_status.get("conditions"), [
        condition("Ready", False, reason, message, now),
        condition("Issuing", False, reason, message, now),
    ])}
