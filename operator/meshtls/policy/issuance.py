"""What an issuance produces for the API: the Secret's content and the identity's status, derived in one place."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
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
from meshtls.api.names import iso
from meshtls.pki import CertificateAuthority, IssuedCertificate, issue_svid
from meshtls.policy.renewal import scheduled_renewal
from meshtls.policy.triggers import (
    ANNOTATION_GENERATION,
    ANNOTATION_ISSUED_AT,
    ANNOTATION_ON_SCHEDULE,
    ANNOTATION_RENEWAL_TIME,
)

# Serials revoked on deletion: every certificate of the identity that has not yet expired.
MAX_TRACKED_SERIALS = 64


@dataclass(frozen=True)
class Issuance:
    certificate: IssuedCertificate
    renewal_time: dt.datetime
    issued_at: dt.datetime
    on_schedule: bool = True
    clamped: bool = False  # the spec asked for a renewal sooner than the re-issue floor

    @property
    def serial(self) -> str:
        return self.certificate.serial_hex


def issue_for(identity: EffectiveIdentity, ca: CertificateAuthority, now: dt.datetime,
              on_schedule: bool = True) -> Issuance:
    cert = issue_svid(ca, identity.spiffe_id, now, identity.ttl, identity.spec.dns_names, identity.key_algorithm,
                      backdate=identity.backdate)
    due, clamped = scheduled_renewal(now, cert.not_after, identity.renew_at_fraction, identity.renew_before,
                                     seed=cert.serial_hex, on_schedule=on_schedule)
    return Issuance(cert, due, now, on_schedule, clamped)


def secret_body(identity: EffectiveIdentity, issuance: Issuance, owner: dict[str, Any],
                generation: int | None = None) -> dict[str, Any]:
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
                ANNOTATION_ON_SCHEDULE: "true" if issuance.on_schedule else "false",
                ANNOTATION_OWNER_UID: owner["uid"],
                **({ANNOTATION_GENERATION: str(generation)} if generation is not None else {}),
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


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def tracked_serials(
    previous: list[dict[str, str]] | None, new: Issuance | None, now: dt.datetime, trust_domain: str = "",
    dropped: frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    """Serials still valid (revoked on deletion), each with the trust domain that issued it (whose CRL must carry
    it); expired and `dropped` (already revoked) ones leave, the list stays short."""
    kept = [e for e in previous or [] if parse_time(e["notAfter"]) > now and e.get("serial") not in dropped]
    if new is not None:
        entry = {"serial": new.serial, "notAfter": iso(new.certificate.not_after)}
        if trust_domain:
            entry["trustDomain"] = trust_domain
        kept.append(entry)
    return kept[-MAX_TRACKED_SERIALS:]


@dataclass(frozen=True)
class Superseded:
    """What a spec change left behind: certificates to revoke (by the trust domain that issued them) and the Secret
    under the old name."""

    serials: dict[str, list[tuple[str, dt.datetime]]]  # issuer trust domain -> [(serial hex, notAfter)]
    old_secret_name: str | None
    reason: str


def superseded_by_spec(status: dict[str, Any], identity: EffectiveIdentity, dns_names_changed: bool,
                       now: dt.datetime) -> Superseded | None:
    """A change of serviceAccountName, trustDomain (the SPIFFE ID), dnsNames or secretName leaves nothing valid
    behind: every still-valid certificate issued under the old values is revoked on its issuer's CRL, and the old
    Secret goes. A change of ttl, key algorithm or renewal point keeps the old certificates (same names, same
    identity): they just rotate out."""
    old_id, old_secret, old_td = status.get("spiffeID"), status.get("secretName"), status.get("trustDomain")
    if not status.get("serialNumber"):
        return None
    moved = bool(old_secret) and old_secret != identity.spec.secret_name
    reasons = []
    if old_id and old_id != str(identity.spiffe_id):
        reasons.append(f"SPIFFE ID {old_id} -> {identity.spiffe_id}")
    if dns_names_changed:
        reasons.append("dnsNames changed")
    if moved:
        reasons.append(f"secretName {old_secret} -> {identity.spec.secret_name}")
    if not reasons:
        return None
    serials: dict[str, list[tuple[str, dt.datetime]]] = {}
    for entry in active_serials(status, now):
        serials.setdefault(entry.get("trustDomain") or str(old_td or identity.trust_domain), []).append(
            (entry["serial"], parse_time(entry["notAfter"])))
    return Superseded(serials, old_secret if moved else None, "; ".join(reasons))


def active_serials(status: dict[str, Any], now: dt.datetime) -> list[dict[str, str]]:
    """Every still-valid serial the status knows, the current one included even if an older status missed it."""
    entries = [e for e in status.get("activeSerials") or [] if e.get("serial") and e.get("notAfter")
               and parse_time(e["notAfter"]) > now]
    current = status.get("serialNumber")
    if current and status.get("notAfter") and not any(e["serial"] == current for e in entries) \
            and parse_time(status["notAfter"]) > now:
        entries.append({"serial": current, "notAfter": status["notAfter"],
                        **({"trustDomain": status["trustDomain"]} if status.get("trustDomain") else {})})
    return entries


def revocations_by_issuer(status: dict[str, Any], fallback_trust_domain: str,
                          now: dt.datetime) -> dict[str, list[tuple[str, dt.datetime]]]:
    """On deletion: every still-valid serial, grouped by the trust domain whose CRL must carry it."""
    grouped: dict[str, list[tuple[str, dt.datetime]]] = {}
    for entry in active_serials(status, now):
        issuer = entry.get("trustDomain") or status.get("trustDomain") or fallback_trust_domain
        grouped.setdefault(str(issuer), []).append((entry["serial"], parse_time(entry["notAfter"])))
    return grouped


FLOOR_CONDITION = "RenewalClamped"


def floor_condition(old: list[dict[str, Any]] | None, clamped: bool, message: str,
                    now: dt.datetime) -> dict[str, str] | None:
    """The condition that says the re-issue floor holds the spec back, when it changes (None: nothing to write).
    True once per change: the Warning Event goes with the transition, never with every clamp."""
    current = next((c for c in old or [] if c.get("type") == FLOOR_CONDITION), None)
    if clamped and (current is None or current.get("status") != "True"):
        return condition(FLOOR_CONDITION, True, "RenewalFloor", message, now)
    if not clamped and current is not None and current.get("status") == "True":
        return condition(FLOOR_CONDITION, False, "RenewalFloor", "the renewal schedule is above the floor", now)
    return None


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
                  ca_fingerprint: str, renew_request: str | None, now: dt.datetime,
                  revoked: frozenset[str] = frozenset()) -> dict[str, Any]:
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
        "activeSerials": tracked_serials(old_status.get("activeSerials"), issuance, now, identity.trust_domain,
                                         revoked),
        "conditions": merge_conditions(old_status.get("conditions"), [
            condition("Ready", True, "Issued", f"certificate {cert.serial_hex} valid until {iso(cert.not_after)}", now),
            condition("Issuing", False, "Issued", "certificate is up to date", now),
        ]),
    }
    if identity.has_sidecar:  # the DataPlane column, written with the certificate rather than by a write of its own
        status["dataPlane"] = identity.data_plane.value
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


def secret_digest(data: Mapping[str, bytes]) -> str:
    """The Secret's content as meshtls wrote or verified it: any other content is looked at again."""
    h = hashlib.sha256()
    for key in sorted(data):
        h.update(key.encode() + b"\0" + bytes(data[key]) + b"\0")
    return h.hexdigest()


OVERLAP_CONDITION = "Overlapping"


def overlap_condition(old: list[dict[str, Any]] | None, service_account: str, others: list[str],
                      now: dt.datetime) -> dict[str, str] | None:
    """Overlapping=True naming the identities that would put certificates on the same pods (same ServiceAccount,
    pod selectors some pod matches both); None when the condition already says so."""
    current = next((c for c in old or [] if c.get("type") == OVERLAP_CONDITION), None)
    if others:
        message = (f"identities {', '.join(others)} select the same pods of ServiceAccount {service_account}: "
                   "a pod can carry only one identity's certificate")
        if current is None or current.get("status") != "True" or current.get("message") != message:
            return condition(OVERLAP_CONDITION, True, "SamePods", message, now)
        return None
    if current is not None and current.get("status") == "True":
        return condition(OVERLAP_CONDITION, False, "NoOverlap", "no other identity selects these pods", now)
    return None
