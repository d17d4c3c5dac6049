"""The admission decision for a WorkloadIdentity being created: it gets meshtls's finalizer in the same write.

Pure, like the pod decision beside it. The finalizer set at admission saves the operator a PATCH (and the watch
event it brings back) per identity. The webhook rule is failurePolicy Ignore: an identity created while no operator
answers comes in without the finalizer, and the operator adds it with a PATCH when it first sees it, as before.
It never denies: a bad review gets a 400 the API server ignores, anything else is allowed, patched or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshtls.api.constants import FINALIZER, GROUP, KIND_WORKLOAD_IDENTITY
from meshtls.injection.admission import MAX_BODY, AdmissionOutcome, _allow, read_review

FINALIZER_PATH = "/finalize"


def _is_identity_create(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return (isinstance(kind, dict) and kind.get("group") == GROUP and kind.get("kind") == KIND_WORKLOAD_IDENTITY
            and request.get("operation") == "CREATE" and not request.get("subResource"))


def finalizer_patch(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch that adds meshtls's finalizer to an object, keeping any other; [] when it has it already."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [{"op": "add", "path": "/metadata", "value": {"finalizers": [FINALIZER]}}]
    finalizers = meta.get("finalizers")
    if not isinstance(finalizers, list) or not finalizers:
        return [{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]
    if FINALIZER in finalizers:
        return []
    return [{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}]


def review_identity_admission(body: bytes, max_body: int = MAX_BODY) -> AdmissionOutcome:
    """Allow every review; a WorkloadIdentity CREATE without meshtls's finalizer gets a patch adding it."""
    review = read_review(body, max_body)
    if isinstance(review, AdmissionOutcome):
        return review
    uid, request = review
    obj = request.get("object")
    if not _is_identity_create(request) or not isinstance(obj, dict):
        return _allow(uid)
    return _allow(uid, patch=finalizer_patch(obj))
