"""The admission decision for one pod: an AdmissionReview's bytes in, the HTTP status and response body out.

Pure: the caller supplies the candidate identities (`lookup`, answered from memory) and posts the Event this returns.
It never raises and never answers 500:

- a body that is not an `admission.k8s.io/v1` AdmissionReview with a `request.uid` (malformed JSON, oversized,
  wrong kind) gets HTTP 400 with an AdmissionReview-shaped JSON body saying why;
- anything else gets HTTP 200 and a response echoing the uid: allowed unchanged (not a pod CREATE, opted out,
  already injected, no identity or an ambiguous one: the last two with a warning and an Event), allowed with a
  JSON Patch, or denied with a message (a pod whose fields have the wrong types, or an internal error).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshtls.api.constants import LABEL_INJECT_POD
from meshtls.api.reasons import Reason
from meshtls.injection.inject import (
    ALREADY_INJECTED,
    PodShapeError,
    build_injection_patch,
    injected_marker,
    pod_labels,
    pod_metadata,
    pod_service_account,
)
from meshtls.injection.target import InjectionOptions, InjectionTarget

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
MAX_BODY = 3 * 1024 * 1024
# The API server may truncate a warning over 256 characters and drops them past 4096 in all.
MAX_WARNING = 256
MAX_EVENT_MESSAGE = 1024
MAX_NAMED = 5

Lookup = Callable[[str, str], list[InjectionTarget]]  # (namespace, serviceAccount) -> candidates


@dataclass(frozen=True)
class AdmissionOutcome:
    http_status: int
    response: dict[str, Any]
    event: tuple[str, str] | None = None  # (reason, message) for a Warning Event on the pod's namespace


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _clean(text: str, limit: int) -> str:
    """One printable line of at most `limit` characters (names in it come from the request)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _review(response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _bad_request(message: str) -> AdmissionOutcome:
    message = _clean(f"meshtls: bad admission request: {message}", MAX_EVENT_MESSAGE)
    status = {"status": "Failure", "code": 400, "reason": "BadRequest", "message": message}
    return AdmissionOutcome(400, _review({"uid": "", "allowed": False, "status": status}))


def _allow(uid: str, warnings: list[str] | None = None, patch: list[dict[str, Any]] | None = None,
           event: tuple[str, str] | None = None) -> AdmissionOutcome:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode("ascii")
    response["warnings"] = [_clean(w, MAX_WARNING) for w in warnings or []]
    if event is not None:
        event = (event[0], _clean(event[1], MAX_EVENT_MESSAGE))
    return AdmissionOutcome(200, _review(response), event)


def _deny(uid: str, code: int, reason: str, message: str) -> AdmissionOutcome:
    status = {"status": "Failure", "code": code, "reason": reason, "message": _clean(message, MAX_EVENT_MESSAGE)}
    return AdmissionOutcome(200, _review({"uid": uid, "allowed": False, "status": status}))


def _parse(body: bytes, max_body: int) -> tuple[str, dict[str, Any]]:
    """(uid, request) of a well-formed AdmissionReview, or _BadRequest saying what is wrong."""
    if not isinstance(body, bytes | bytearray | memoryview | str):
        raise _BadRequest(f"the body must be bytes, not {type(body).__name__}")
    if len(body) > max_body:
        raise _BadRequest(f"the body is {len(body)} bytes, over the {max_body}-byte limit")
    try:
        review = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(f"the body is not valid JSON ({exc})") from None
    if not isinstance(review, dict):
        raise _BadRequest("the body is not a JSON object")
    if review.get("kind") != KIND or review.get("apiVersion") != API_VERSION:
        raise _BadRequest(f"expected kind {KIND}, apiVersion {API_VERSION} "
                          f"(got {review.get('kind')!r:.40}, {review.get('apiVersion')!r:.60})")
    request = review.get("request")
    if not isinstance(request, dict):
        raise _BadRequest("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise _BadRequest("request.uid is missing or not a string")
    return uid, request


def read_review(body: bytes, max_body: int = MAX_BODY) -> tuple[str, dict[str, Any]] | AdmissionOutcome:
    """(uid, request) of a well-formed AdmissionReview, or the 400 answer to give. The boundary: never raises."""
    try:
        return _parse(body, max_body)
    except _BadRequest as exc:
        return _bad_request(exc.message)
    except Exception as exc:  # whatever the bytes, answer
        return _bad_request(f"unreadable request ({type(exc).__name__}: {exc})")


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind, resource = request.get("kind"), request.get("resource")
    if isinstance(kind, dict):
        return kind.get("kind") == "Pod" and not kind.get("group")
    if isinstance(resource, dict):
        return resource.get("resource") == "pods" and not resource.get("group")
    return False


def _namespace(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    for value in (request.get("namespace"), pod_metadata(pod).get("namespace")):
        if isinstance(value, str) and value:
            return value
    raise PodShapeError("request.namespace", "is missing (and so is the pod's metadata.namespace)")


def _names(targets: list[InjectionTarget]) -> str:
    names = sorted(t.identity_name for t in targets)
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


def _decide(uid: str, request: Mapping[str, Any], lookup: Lookup, options: InjectionOptions) -> AdmissionOutcome:
    if not _is_pod(request) or request.get("operation") != "CREATE" or request.get("subResource"):
        return _allow(uid)
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise PodShapeError("request.object", "must be the Pod being created")
    labels = pod_labels(pod)
    if labels.get(LABEL_INJECT_POD, "").strip().lower() == "false":
        return _allow(uid)
    marker = injected_marker(pod)
    if marker is not None:
        return _allow(uid, [ALREADY_INJECTED.format(marker)])

    namespace = _namespace(request, pod)
    service_account = pod_service_account(pod)
    candidates: list[InjectionTarget] = []
    for t in lookup(namespace, service_account) or []:
        # defence in depth: the lookup is filtered already, but a pod never gets another ServiceAccount's identity
        if isinstance(t, InjectionTarget) and t.service_account == service_account and t not in candidates:
            candidates.append(t)
    matching = [t for t in candidates if t.selects(labels)]
    quiet = request.get("dryRun") is True  # a dry run leaves no trace, Events included

    if not matching:
        message = (f"meshtls: no WorkloadIdentity in {namespace} for ServiceAccount {service_account}; "
                   "pod admitted without a sidecar")
        if candidates:
            message += f" (the podSelector of {_names(candidates)} does not match the pod's labels)"
        return _allow(uid, [message], event=None if quiet else (Reason.IDENTITY_NOT_FOUND, message))
    if len(matching) > 1:
        message = (f"meshtls: {len(matching)} WorkloadIdentities in {namespace} for ServiceAccount "
                   f"{service_account} select this pod ({_names(matching)}); pod admitted without a sidecar: "
                   "make their podSelectors disjoint")
        return _allow(uid, [message], event=None if quiet else (Reason.IDENTITY_AMBIGUOUS, message))

    result = build_injection_patch(pod, matching[0], options)
    return _allow(uid, result.warnings, result.patch)


def review_pod_admission(body: bytes, lookup: Lookup, options: InjectionOptions,
                         max_body: int = MAX_BODY) -> AdmissionOutcome:
    """Decide one AdmissionReview; see the module docstring. Never raises."""
    review = read_review(body, max_body)
    if isinstance(review, AdmissionOutcome):
        return review
    uid, request = review
    try:
        return _decide(uid, request, lookup, options)
    except PodShapeError as exc:
        return _deny(uid, 400, "BadRequest", f"meshtls: cannot inject this pod: {exc}")
    except Exception as exc:  # a bug, or the caller's lookup failing: deny loudly rather than skip silently
        return _deny(uid, 500, "InternalError", f"meshtls: internal error while injecting: {type(exc).__name__}: {exc}")
