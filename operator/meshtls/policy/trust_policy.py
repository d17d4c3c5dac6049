"""Trust domains' decisions, pure: which trust domain an identity uses, what a namespace's bundle holds, when a
CRL is re-signed, when a status or a problem is worth writing or reporting again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtls.api.constants import ANNOTATION_DEFAULT_TRUST_DOMAIN

MIN_CRL_RESIGN = dt.timedelta(seconds=5)  # a CRL validity of almost nothing must not make a signing loop
_CERT_END = "-----END CERTIFICATE-----"
_CRL_END = "-----END X509 CRL-----"


# --- which trust domain --------------------------------------------------------------------------------------------


def marked_default(annotations: Mapping[str, str] | None) -> bool:
    return str((annotations or {}).get(ANNOTATION_DEFAULT_TRUST_DOMAIN, "")).strip().lower() == "true"


@dataclass(frozen=True)
class TrustDomainChoice:
    name: str | None  # None: no choice possible, see reason and message
    reason: str = ""
    message: str = ""


def choose_trust_domain(requested: str | None, pinned: str | None, domains: Mapping[str, bool]) -> TrustDomainChoice:
    """The trust domain an identity is issued under.

    `domains` maps every TrustDomain that exists to whether it is marked the default. The order of precedence is
    spec.trustDomain, then the one the identity was issued under (status.trustDomain: creating another TrustDomain
    must never move or stop an identity), then the only TrustDomain, then the one marked default.
    """
    for name, where in ((requested, "spec.trustDomain"), (pinned, "status.trustDomain (issued under)")):
        if name:
            if name in domains:
                return TrustDomainChoice(name)
            return TrustDomainChoice(None, "UnknownTrustDomain", f"{where}: TrustDomain {name!r} does not exist")
    names = sorted(domains)
    if len(names) == 1:
        return TrustDomainChoice(names[0])
    defaults = [n for n in names if domains[n]]
    if len(defaults) == 1:
        return TrustDomainChoice(defaults[0])
    if not names:
        return TrustDomainChoice(None, "UnknownTrustDomain", "spec.trustDomain: the cluster has no TrustDomain")
    choices = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if defaults:
        why = f"{len(defaults)} are marked {ANNOTATION_DEFAULT_TRUST_DOMAIN}=true ({', '.join(defaults)})"
    else:
        why = f"none is marked {ANNOTATION_DEFAULT_TRUST_DOMAIN}=true"
    return TrustDomainChoice(None, "UnknownTrustDomain",
                             f"spec.trustDomain is required: the cluster has {len(names)} TrustDomains ({choices}) "
                             f"and {why}")


def default_conflict(domains: Mapping[str, bool]) -> list[str]:
    """The TrustDomains marked default when more than one is (each gets a condition), else []."""
    defaults = sorted(n for n, is_default in domains.items() if is_default)
    return defaults if len(defaults) > 1 else []


# --- bundles -------------------------------------------------------------------------------------------------------


def unique_pem_blocks(text: str, end: str = _CERT_END) -> str:
    """Each PEM block once, in order of first appearance."""
    blocks: list[str] = []
    for chunk in text.split(end)[:-1]:
        start = chunk.find("-----BEGIN")
        if start < 0:
            continue
        block = chunk[start:] + end + "\n"
        if block not in blocks:
            blocks.append(block)
    return "".join(blocks)


@dataclass(frozen=True)
class BundleContribution:
    """What one trust domain puts into a namespace's bundle: its roots (and federated ones) and their CRLs."""

    trust_domain: str
    roots_pem: str
    crls_pem: str


def merge_bundle(contributions: Sequence[BundleContribution]) -> dict[str, str]:
    """One bundle for every trust domain that publishes into the same ConfigMap: all roots and all CRLs, in the
    order of the trust domains' names (stable, so an unchanged set writes nothing)."""
    ordered = sorted(contributions, key=lambda c: c.trust_domain)
    return {"ca.crt": unique_pem_blocks("".join(c.roots_pem for c in ordered)),
            "crl.pem": unique_pem_blocks("".join(c.crls_pem for c in ordered), _CRL_END)}


def bundle_trust_domains(contributions: Sequence[BundleContribution]) -> str:
    """The annotation value naming the trust domains a bundle carries."""
    return ",".join(sorted({c.trust_domain for c in contributions}))


def bundle_matches(current: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """Judged by content alone: a deleted bundle, a replaced CRL or an appended CA all differ."""
    return current is not None and dict(current) == dict(wanted)


# --- CRLs ----------------------------------------------------------------------------------------------------------


def crl_resign_at(signed_at: dt.datetime, validity: dt.timedelta) -> dt.datetime:
    """Half-way through its validity: sidecars fail closed on an expired CRL, so it is renewed long before."""
    return signed_at + max(validity / 2, MIN_CRL_RESIGN)


# --- status --------------------------------------------------------------------------------------------------------


def merge_status(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """`new` with each condition's lastTransitionTime carried over from `old` while its status is the same."""
    previous = {c.get("type"): c for c in (old or {}).get("conditions") or [] if isinstance(c, Mapping)}
    out = dict(new)
    if "conditions" in new:
        conditions = []
        for c in new["conditions"]:
            prev = previous.get(c["type"])
            if prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime"):
                c = {**c, "lastTransitionTime": prev["lastTransitionTime"]}
            conditions.append(c)
        out["conditions"] = conditions
    return out


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The status to write, or None when writing it would change nothing (no resourceVersion churn)."""
    merged = merge_status(old, new)
    current = old or {}
    if all(current.get(k) == v for k, v in merged.items()):
        return None
    return merged


def with_condition(old: Mapping[str, Any] | None, replacement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The old conditions with one replaced (by type), for a status that only changes that one."""
    kept = [dict(c) for c in (old or {}).get("conditions") or [] if c.get("type") != replacement["type"]]
    return [dict(replacement), *kept]


# --- reporting problems --------------------------------------------------------------------------------------------


def problem_changed(previous: tuple[str, str] | None, reason: str, message: str) -> bool:
    """A problem is reported (condition + one Warning Event) when it first appears or says something new."""
    return previous != (reason, message)
