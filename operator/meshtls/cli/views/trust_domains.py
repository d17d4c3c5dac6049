"""`meshtls ca`: what a TrustDomain's CA and rotation look like, whether a rotation may be asked for, and how far
one has got. Pure: each function takes the TrustDomain's body (the API's camelCase JSON) and, where time matters,
a `now`; `commands.ca` does the reading and writing.

The operator (controller/trust/rotation.py, policy/ca_rotation.py) starts a rotation when the annotation
`meshtls.dev/rotate-ca` holds a value other than `status.rotation.lastRequest` while the phase is Stable, and only
for a CA it generated: a brought CA (`spec.ca.secretRef`) has no key above it to sign a successor.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from meshtls.api.model import SpecError, parse_trust_domain
from meshtls.cli.output import new_table
from meshtls.cli.views.identities import condition, ready_cell
from meshtls.cli.views.times import ago, parse_time
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE

CA_COLUMNS = ("NAME", "READY", "CA", "SOURCE", "NOT AFTER", "PHASE", "SINCE", "NEXT", "PREVIOUS", "RETIRE AFTER",
              "CRL", "REVOKED")
REQUESTED = "Requested"  # the annotation is set; the operator has not answered yet
FALLBACK_PROPAGATION_DELAY = dt.timedelta(seconds=90)
WAIT_MARGIN = dt.timedelta(seconds=60)  # --wait's default timeout: the propagation delay plus this


def short(fingerprint: str | None) -> str:
    return f"sha256:{fingerprint[:12]}" if fingerprint else "-"


def brought_secret(body: Mapping[str, Any]) -> str | None:
    return ((((body.get("spec") or {}).get("ca") or {}).get("secretRef")) or {}).get("name")


def trust_domain_row(body: Mapping[str, Any]) -> dict[str, Any]:
    """One TrustDomain's CA and rotation as data: what the table shows, with the full fingerprints."""
    status = body.get("status") or {}
    rotation = status.get("rotation") or {}
    ready = condition(body, "Ready")
    expiring = condition(body, "CAExpiring")
    secret = brought_secret(body)
    return {
        "name": (body.get("metadata") or {}).get("name"),
        "ready": ready.get("status", "Unknown"),
        "reason": ready.get("reason"),
        "message": ready.get("message"),
        "source": f"secretRef {secret}" if secret else "generated",
        "caFingerprint": status.get("caFingerprint"),
        "caNotAfter": status.get("caNotAfter"),
        "phase": rotation.get("phase") or (STABLE if status.get("caFingerprint") else None),
        "since": rotation.get("since"),
        "nextFingerprint": rotation.get("nextFingerprint"),
        "previousFingerprint": rotation.get("previousFingerprint"),
        "retireAfter": rotation.get("retireAfter"),
        "lastRequest": rotation.get("lastRequest"),
        "crlNumber": status.get("crlNumber"),
        "crlEntries": status.get("crlEntries"),
        "caExpiring": expiring.get("message") if expiring.get("status") == "True" else None,
    }


def _when(value: str | None, now: dt.datetime) -> str:
    t = parse_time(value)
    return f"{value} ({ago(t, now)})" if t else "-"


def trust_domains_table(rows: Sequence[Mapping[str, Any]], now: dt.datetime) -> Table:
    table = new_table(CA_COLUMNS)
    for row in rows:
        phase = row.get("phase") or "-"
        table.add_row(
            Text(str(row["name"]), style="bold"), ready_cell(row), Text(short(row.get("caFingerprint"))),
            Text(str(row["source"])), Text(_when(row.get("caNotAfter"), now)),
            Text(phase, style="" if phase in (STABLE, "-") else "yellow"), Text(_when(row.get("since"), now)),
            Text(short(row.get("nextFingerprint"))), Text(short(row.get("previousFingerprint"))),
            Text(_when(row.get("retireAfter"), now)),
            Text(f"#{row['crlNumber']}" if row.get("crlNumber") is not None else "-"),
            Text(str(row["crlEntries"]) if row.get("crlEntries") is not None else "-"),
        )
    return table


def trust_domain_detail(body: Mapping[str, Any], now: dt.datetime) -> RenderableType:
    """`ca status NAME`: the row, then the conditions (a brought CA's CAExpiring says what to do)."""
    conditions = new_table(("TYPE", "STATUS", "REASON", "MESSAGE", "LAST TRANSITION"))
    for c in (body.get("status") or {}).get("conditions") or []:
        conditions.add_row(Text(str(c.get("type", ""))), Text(str(c.get("status", ""))),
                           Text(str(c.get("reason", ""))), Text(str(c.get("message", ""))),
                           Text(ago(parse_time(c.get("lastTransitionTime")), now)))
    return Group(trust_domains_table([trust_domain_row(body)], now), Text(""), Text("Conditions:", style="bold"),
                 conditions)


# --- rotate ----------------------------------------------------------------------------------------------------------


def rotation_refusal(body: Mapping[str, Any]) -> str | None:
    """Why the operator would not start a rotation on request now (so the CLI asks for nothing); None: it would."""
    name = (body.get("metadata") or {}).get("name")
    secret = brought_secret(body)
    if secret:
        return (f"TrustDomain {name} brings its own CA (spec.ca.secretRef: Secret {secret} in the operator's "
                f"namespace): meshtls holds no key above it to sign a successor. Rotate it by replacing that "
                f"Secret's tls.crt/tls.key with the new CA; the operator adds the replacement to every bundle and "
                f"switches to it (Preparing -> Rotating) within 30 s. Follow it with: meshtls ca status {name}")
    ready = condition(body, "Ready")
    if ready.get("status") != "True":
        why = f"{ready.get('reason')}: {ready.get('message')}" if ready else "no Ready condition yet (is the " \
                                                                              "operator running?)"
        return f"TrustDomain {name} is not Ready ({why}): the operator cannot rotate its CA until that is fixed"
    rotation = (body.get("status") or {}).get("rotation") or {}
    phase = rotation.get("phase") or STABLE
    if phase == PREPARING:
        return (f"TrustDomain {name} is already rotating: phase Preparing since {rotation.get('since')}, new CA "
                f"{short(rotation.get('nextFingerprint'))} signs after the propagation delay. Follow it with: "
                f"meshtls ca status {name}")
    if phase == ROTATING:
        return (f"TrustDomain {name}'s last rotation is still retiring the old CA "
                f"{short(rotation.get('previousFingerprint'))} (trusted until {rotation.get('retireAfter')}); a new "
                "rotation can start once it has left the bundles")
    if phase != STABLE:
        return f"TrustDomain {name} reports an unknown rotation phase {phase!r}"
    return None


def default_wait(body: Mapping[str, Any]) -> dt.timedelta:
    """How long `ca rotate --wait` waits by default: the trust domain's propagation delay plus a margin."""
    try:
        delay = parse_trust_domain(body).ca_propagation_delay
    except SpecError:
        delay = FALLBACK_PROPAGATION_DELAY
    return delay + WAIT_MARGIN


@dataclass(frozen=True)
class RotationProgress:
    phase: str  # Requested | Preparing | Rotating (signing switched)
    since: str | None  # when the operator entered the phase (its clock)
    message: str
    switched: bool = False  # signing moved to the new CA: what --wait waits for
    failure: str | None = None  # the trust domain reports a problem: stop waiting


def rotation_progress(body: Mapping[str, Any], request: str, old_fingerprint: str | None) -> RotationProgress:
    """How far the rotation asked for by `request` has got, from the TrustDomain's status."""
    name = (body.get("metadata") or {}).get("name")
    status = body.get("status") or {}
    rotation = status.get("rotation") or {}
    ready = condition(body, "Ready")
    if ready.get("status") == "False":
        return RotationProgress(rotation.get("phase") or REQUESTED, ready.get("lastTransitionTime"), "",
                                failure=f"TrustDomain {name} reports Ready=False ({ready.get('reason')}: "
                                        f"{ready.get('message')})")
    if rotation.get("lastRequest") != request:
        return RotationProgress(REQUESTED, None, "waiting for the operator to take the request")
    phase = rotation.get("phase")
    signing = rotation.get("signingFingerprint") or status.get("caFingerprint")
    if phase == PREPARING:
        return RotationProgress(PREPARING, rotation.get("since"),
                                f"new CA {short(rotation.get('nextFingerprint'))} added to every bundle beside "
                                f"{short(signing)}; it signs after the propagation delay")
    if signing and signing != old_fingerprint:
        retire = rotation.get("retireAfter")
        return RotationProgress(ROTATING, rotation.get("since"),
                                f"signing switched to CA {short(signing)}; identities re-issue now; old CA "
                                f"{short(old_fingerprint)} trusted until {retire or 'its last certificate expires'}",
                                switched=True)
    return RotationProgress(str(phase or REQUESTED), rotation.get("since"), "",
                            failure=f"the operator took request {request} but TrustDomain {name} is {phase} with the "
                                    f"same CA {short(signing)}")
