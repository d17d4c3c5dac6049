"""`meshtls ca rotate | status`: the work (declared in `cli.arguments`). Reads and writes through `meshtls.kube`;
what to print and whether to ask is decided in `views.trust_domains` (pure)."""

from __future__ import annotations

import argparse
import datetime as dt
import time
import uuid
from typing import Any

from rich.text import Text

from meshtls.api.constants import ANNOTATION_ROTATE_CA, GROUP, TRUST_DOMAINS
from meshtls.api.names import iso
from meshtls.cli.commands.cluster import timeout_seconds, utc_now
from meshtls.cli.errors import CommandFailed
from meshtls.cli.output import Output
from meshtls.cli.views import trust_domains
from meshtls.kube.client import ApiError, Kube, NotFound
from meshtls.kube.queries import Connection, annotate_trust_domain

POLL = 0.5  # seconds between reads while following a rotation (it takes the propagation delay: minutes)


def _forbidden(exc: ApiError, what: str) -> CommandFailed:
    return CommandFailed(f"no permission to {what}: {str(exc).split(': ', 1)[-1]}")


def _list_trust_domains(kube: Kube) -> list[dict[str, Any]]:
    try:
        return kube.list_trust_domains()
    except NotFound:
        raise CommandFailed("the TrustDomain CRD is not installed on this cluster (kubectl apply -f crds/, or "
                            "install the Helm chart)") from None
    except ApiError as exc:
        if exc.status == 403:
            raise _forbidden(exc, f"list {TRUST_DOMAINS}.{GROUP}") from None
        raise


def _get_trust_domain(kube: Kube, name: str) -> dict[str, Any]:
    try:
        body = kube.get_trust_domain(name)
    except ApiError as exc:
        if exc.status == 403:
            raise _forbidden(exc, f"read TrustDomain {name}") from None
        raise
    if body is not None:
        return body
    names = sorted(str(b["metadata"]["name"]) for b in _list_trust_domains(kube))
    known = f"the cluster has: {', '.join(names)}" if names else "the cluster has no TrustDomains"
    raise CommandFailed(f"TrustDomain {name!r} not found; {known}")


# --- status ----------------------------------------------------------------------------------------------------------


def status(args: argparse.Namespace, conn: Connection) -> int:
    kube, out, now = conn.kube, Output(args.output), utc_now()
    if args.name:
        body = _get_trust_domain(kube, args.name)
        if out.data:
            out.dump({**trust_domains.trust_domain_row(body),
                      "conditions": list((body.get("status") or {}).get("conditions") or [])})
        else:
            out.show(trust_domains.trust_domain_detail(body, now))
        return 0
    bodies = sorted(_list_trust_domains(kube), key=lambda b: str(b["metadata"]["name"]))
    rows = [trust_domains.trust_domain_row(b) for b in bodies]
    if out.data:
        out.dump({"items": rows})
    elif not rows:
        out.show(Text("No TrustDomains found."))
    else:
        out.show(trust_domains.trust_domains_table(rows, now))
    return 0


# --- rotate ----------------------------------------------------------------------------------------------------------


def rotate(args: argparse.Namespace, conn: Connection) -> int:
    kube, out = conn.kube, Output(args.output)
    body = _get_trust_domain(kube, args.name)
    refusal = trust_domains.rotation_refusal(body)
    if refusal is not None:
        raise CommandFailed(refusal)
    old = (body.get("status") or {}).get("caFingerprint")
    timeout = timeout_seconds(args) if args.timeout else trust_domains.default_wait(body).total_seconds()
    # a fresh value every time: the operator serves a value once (status.rotation.lastRequest), never twice
    request = f"{utc_now():%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    try:
        annotate_trust_domain(kube, args.name, {ANNOTATION_ROTATE_CA: request})
    except ApiError as exc:
        if exc.status == 403:
            raise _forbidden(exc, f"patch TrustDomain {args.name} (rotating a CA sets an annotation on it)") from None
        raise
    except NotFound:
        raise CommandFailed(f"TrustDomain {args.name!r} was deleted") from None
    started = time.monotonic()
    result: dict[str, Any] = {"trustDomain": args.name, "request": request, "oldFingerprint": old,
                              "phases": [{"phase": trust_domains.REQUESTED, "since": iso(utc_now()), "seconds": 0.0}]}
    _say(out, trust_domains.REQUESTED, iso(utc_now()), f"CA rotation of {args.name} (request {request}); signing CA "
                                              f"{trust_domains.short(old)}")
    if not args.wait:
        if out.data:
            out.dump(result)
        else:
            out.show(Text(f"follow it with: meshtls ca status {args.name}"))
        return 0
    deadline = started + timeout
    seen = {trust_domains.REQUESTED}
    progress: trust_domains.RotationProgress | None = None
    while True:
        current = kube.get_trust_domain(args.name)
        if current is None:
            raise CommandFailed(f"TrustDomain {args.name} was deleted while waiting")
        progress = trust_domains.rotation_progress(current, request, old)
        if progress.failure:
            _finish(out, result, False)
            raise CommandFailed(progress.failure)
        if progress.phase not in seen:
            seen.add(progress.phase)
            seconds = round(time.monotonic() - started, 3)
            result["phases"].append({"phase": progress.phase, "since": progress.since, "seconds": seconds})
            _say(out, progress.phase, progress.since, f"{progress.message} ({seconds:.1f} s)")
        if progress.switched:
            result["signingFingerprint"] = (current.get("status") or {}).get("caFingerprint")
            _finish(out, result, True)
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    _finish(out, result, False)
    waiting_for = "take the request" if progress.phase == trust_domains.REQUESTED else "switch signing to the new CA"
    hint = "is the operator running? (meshtls check)" if progress.phase == trust_domains.REQUESTED else \
        "the switch comes spec.ca.propagationDelay after Preparing"
    raise CommandFailed(f"timed out after {timeout:.0f} s waiting for the operator to {waiting_for} "
                        f"(TrustDomain {args.name}, phase {progress.phase}); {hint}")


def _say(out: Output, phase: str, since: str | None, message: str) -> None:
    if not out.data:
        out.show(Text(f"{since or iso(dt.datetime.now(dt.UTC))}  {phase:<9}  {message}"))


def _finish(out: Output, result: dict[str, Any], switched: bool) -> None:
    result["switched"] = switched
    if out.data:
        out.dump(result)
