"""The identity's rendered sidecar config: written to its ConfigMap when it changed, offered to the injector."""

from __future__ import annotations

from typing import Any

from meshtls.api.constants import LABEL_IDENTITY, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.model import EffectiveIdentity, SpecError
from meshtls.api.names import sidecar_configmap_name
from meshtls.api.reasons import Reason
from meshtls.controller.runtime import Operator, identity_ref
from meshtls.controller.scheduler import IdentityKey
from meshtls.injection.render import check_publishable, injection_target, render_sidecar_files
from meshtls.kube.client import ApiError


async def publish_sidecar_config(op: Operator, body: dict[str, Any], identity: EffectiveIdentity,
                                  bundle_config_map: str) -> None:
    """Identities with inbound or outbound routes, or the Workload API, get their rendered sidecar files (proxy.yaml,
    and Envoy's when that is their data plane) and are offered to the injector; status.dataPlane says which sidecar
    pods get."""
    spec = identity.spec
    key = IdentityKey(spec.namespace, spec.name)
    status = body.get("status") or {}
    if not identity.has_sidecar:
        op.targets.remove(spec.namespace, spec.name)
        if status.get("dataPlane"):  # no sidecar any more: no data plane to show
            await _report_data_plane(op, body, None)
        return
    data = render_sidecar_files(identity)
    check_publishable(identity, data)
    if op.rendered.get(key) != data:
        name = sidecar_configmap_name(spec.name)
        current = await op.kube.run(op.kube.read_configmap, spec.namespace, name)
        if current is not None and current["labels"].get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise SpecError("spec", f"ConfigMap {name} exists and is not managed by meshtls",
                            reason=Reason.CONFIG_CONFLICT)
        labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_IDENTITY: spec.name}
        if current is None or current["data"] != data or any(
                current["labels"].get(k) != v for k, v in labels.items()):
            try:
                await op.kube.run(op.kube.write_configmap, spec.namespace, name, data, labels, current,
                                  identity_ref(body))
            except ApiError as exc:
                if exc.status not in (413, 422):
                    raise
                # too large or otherwise refused as a whole: the same write can only fail again
                raise SpecError("spec", f"the API server refused sidecar ConfigMap {name}: {exc}",
                                reason=Reason.SIDECAR_CONFIG_REFUSED) from None
        op.rendered[key] = data
    # the column users read, once per change; before the first certificate the issuance's status write carries it
    if status.get("serialNumber") and status.get("dataPlane") != identity.data_plane.value:
        await _report_data_plane(op, body, identity.data_plane.value)
    op.targets.put(spec.namespace, injection_target(identity, bundle_config_map))


async def _report_data_plane(op: Operator, body: dict[str, Any], data_plane: str | None) -> None:
    meta = body["metadata"]
    await op.kube.run(op.kube.patch_workload_identity_status, meta["namespace"], meta["name"],
                      {"dataPlane": data_plane})
    body["status"] = {**(body.get("status") or {}), "dataPlane": data_plane}
