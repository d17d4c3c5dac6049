"""Identities of one ServiceAccount whose pod selectors overlap: `Overlapping=True` naming each other."""

from __future__ import annotations

from typing import Any

from meshtls.api.reasons import Reason
from meshtls.controller.runtime import Operator
from meshtls.controller.scheduler import IdentityKey
from meshtls.policy.issuance import merge_conditions, overlap_condition


async def _know_namespace(op: Operator, namespace: str) -> None:
    """Index every identity of a namespace before judging overlaps there: after a restart the first identity
    reconciled must not report "no overlap" only because its neighbours have not been seen yet."""
    if namespace in op.selection_known:
        return
    async with op.selection_lock:  # a restart reconciles a namespace's identities together: one list, not N
        if namespace not in op.selection_known:
            await _index_namespace(op, namespace)


async def _index_namespace(op: Operator, namespace: str) -> None:
    for other in await op.kube.run(op.kube.list_workload_identities, namespace):
        meta, spec = other.get("metadata") or {}, other.get("spec") or {}
        sa = spec.get("serviceAccountName") if isinstance(spec, dict) else None
        if meta.get("deletionTimestamp") or not isinstance(sa, str):
            continue
        labels = (spec.get("podSelector") or {}).get("matchLabels") or {}
        if isinstance(labels, dict):
            op.selection.put(namespace, str(meta.get("name")), sa, {str(k): str(v) for k, v in labels.items()})
    op.selection_known.add(namespace)


async def report_overlaps(op: Operator, key: IdentityKey, body: dict[str, Any], service_account: str,
                           selector: dict[str, str], status: dict[str, Any]) -> None:
    await _know_namespace(op, key[0])
    recheck_overlaps(op, key[0], op.selection.put(key[0], key[1], service_account, selector))
    others = op.selection.overlapping(*key)
    changed = overlap_condition(status.get("conditions"), service_account, others, op.clock.now())
    if changed is None:
        return
    status["conditions"] = merge_conditions(status.get("conditions"), [changed])
    await op.kube.run(op.kube.patch_workload_identity_status, key[0], key[1], {"conditions": status["conditions"]})
    if others:
        await op.post_event(body, "Warning", Reason.OVERLAPPING, changed["message"])


def recheck_overlaps(op: Operator, namespace: str, names: set[str]) -> None:
    """Identities whose set of overlapping identities changed report it again, soon."""
    for other in names:
        op.scheduler.schedule(IdentityKey(namespace, other), op.clock.now())
