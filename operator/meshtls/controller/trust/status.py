"""What a trust domain reports: its status (conditions, rotation, CRL), the problems that do not stop it signing,
each Evented once per change."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshtls.api.names import iso
from meshtls.api.reasons import ConditionType, Reason
from meshtls.controller.trust.domain import TrustDomainRuntime
from meshtls.kube.client import NotFound
from meshtls.pki import drop_expired
from meshtls.policy.issuance import condition
from meshtls.policy.trust_policy import status_patch, with_condition

if TYPE_CHECKING:
    from meshtls.controller.trust.registry import TrustDomains


def status_of(trust: TrustDomains, runtime: TrustDomainRuntime) -> dict[str, Any]:
    now = trust.clock.now()
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
    problems = trust.problems_of(runtime)
    if problems:  # Ready is everything the spec asks for; Issuing says the CA signs regardless
        ready = condition(ConditionType.READY, False, problems[0][1], f"{problems[0][2]} (local issuance continues)",
                          now)
    else:
        ready = condition(ConditionType.READY, True, Reason.CA_READY, signing, now)
    conditions = [ready, condition(ConditionType.ISSUING, True, Reason.CA_READY, signing, now),
                  condition(ConditionType.CA_EXPIRING, runtime.warning is not None,
                            Reason.CA_IN_ROTATION_WINDOW if runtime.warning else Reason.CA_VALID,
                            runtime.warning or "outside its rotation window", now)]
    if runtime.spec.federates_with:
        fed = runtime.federation_problem
        conditions.append(condition(ConditionType.FEDERATED, fed is None,
                                    fed[0] if fed else Reason.FEDERATION_BUNDLES_LOADED,
                                    fed[1] if fed else f"{len(runtime.spec.federates_with)} federated bundle(s) "
                                                       "in every bundle", now))
    conflicts = trust.conflicts_of(runtime)
    conditions.append(condition(ConditionType.BUNDLE_PUBLISHED, not conflicts,
                                Reason.BUNDLE_CONFLICT if conflicts else Reason.PUBLISHED,
                                "; ".join(conflicts[:5]) + (f" (and {len(conflicts) - 5} more)"
                                                            if len(conflicts) > 5 else "")
                                if conflicts else f"bundle ConfigMap {runtime.spec.bundle_configmap} published",
                                now))
    if trust.defaults.get(runtime.name):
        clash = trust.default_conflict()
        conditions.append(condition(
            ConditionType.DEFAULT_TRUST_DOMAIN, not clash, Reason.MULTIPLE_DEFAULTS if clash else Reason.DEFAULT,
            f"TrustDomains {', '.join(clash)} are all marked default: identities without spec.trustDomain and "
            "not yet issued get none" if clash else "identities without spec.trustDomain are issued here", now))
    return {"caFingerprint": runtime.ca.fingerprint, "caNotAfter": iso(runtime.ca.not_after),
            "crlNumber": runtime.crl_number, "crlEntries": len(drop_expired(runtime.revocations, now)),
            "rotation": rotation, "conditions": conditions}


def problems_of(trust: TrustDomains, runtime: TrustDomainRuntime) -> list[tuple[str, str, str]]:
    """(condition type, reason, message) of each thing that does not work although the CA signs."""
    out: list[tuple[str, str, str]] = []
    if runtime.federation_problem:
        out.append((ConditionType.FEDERATED, *runtime.federation_problem))
    conflicts = trust.conflicts_of(runtime)
    if conflicts:
        out.append((ConditionType.BUNDLE_PUBLISHED, Reason.BUNDLE_CONFLICT, "; ".join(conflicts[:5])))
    if trust.defaults.get(runtime.name) and trust.default_conflict():
        out.append((ConditionType.DEFAULT_TRUST_DOMAIN, Reason.MULTIPLE_DEFAULTS,
                    f"TrustDomains {', '.join(trust.default_conflict())} are all marked default"))
    return out


def new_problems(trust: TrustDomains, runtime: TrustDomainRuntime) -> list[tuple[str, str]]:
    """(reason, message) of problems not reported yet: one Warning Event per change, not per look."""
    current = {kind: (reason, message) for kind, reason, message in trust.problems_of(runtime)}
    fresh = [problem for kind, problem in current.items() if runtime.reported.get(kind) != problem]
    runtime.reported = current
    return fresh


async def write_status(trust: TrustDomains, runtime: TrustDomainRuntime) -> bool:
    """Patch the status only when it changes; lastTransitionTime moves only on a transition."""
    patch = status_patch(runtime.last_status, trust.status_of(runtime))
    if patch is None:
        return False
    try:
        await trust.kube.run_first(trust.kube.patch_trust_domain_status, runtime.name, patch)
    except NotFound:
        return False  # deleted meanwhile
    runtime.last_status = {**(runtime.last_status or {}), **patch}
    return True


def failed_status(trust: TrustDomains, old: dict[str, Any], reason: str, message: str) -> dict[str, Any] | None:
    """The status of an unusable trust domain, or None when it already says so."""
    now = trust.clock.now()
    conditions = with_condition(old, condition(ConditionType.ISSUING, False, reason, message, now))
    conditions = with_condition({"conditions": conditions}, condition(ConditionType.READY, False, reason, message, now))
    return status_patch(old, {"conditions": conditions})


_EVENTED_ONCE = (ConditionType.FEDERATED, ConditionType.BUNDLE_PUBLISHED, ConditionType.DEFAULT_TRUST_DOMAIN)


def reported_from(status: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Problems a previous run already reported (its conditions say so): not Evented again after a restart."""
    out = {}
    for c in (status or {}).get("conditions") or []:
        if c.get("type") in _EVENTED_ONCE and c.get("status") == "False":
            message = str(c.get("message"))
            if c.get("type") == ConditionType.BUNDLE_PUBLISHED:
                message = message.split(" (and ")[0]
            out[str(c["type"])] = (str(c.get("reason")), message)
    return out
