"""The pod patch that dresses a pod with its sidecar, `meshtls-proxy` or Envoy (the identity's data plane). Pure: a
pod dict in, RFC 6902 operations out.

The patch only adds (or, for one annotation a user may have pre-set, replaces): it never removes or renames anything
of the pod's. It adds three volumes (the identity Secret, the trust bundle ConfigMap, the rendered proxy.yaml), the
sidecar container, and two annotations naming the identity. A pod that already carries the sidecar (or the injected
annotation) gets an empty patch, so re-admitting an injected pod changes nothing.

A pod whose fields have the wrong types (containers as a string, labels as a list, ...) raises `PodShapeError`
naming the field; the API server never sends such a pod, and guessing would patch something it then rejects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtls.api.constants import ANNOTATION_INJECTED, ANNOTATION_SPIFFE_ID
from meshtls.api.ports import WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.envoy import ENVOY_FILES, envoy_container_command, envoy_drain_command, envoy_ready_command
from meshtls.dataplane.layout import (
    BUNDLE_DIR,
    BUNDLE_FILE,
    CONFIG_DIR,
    CONFIG_FILE,
    CRL_FILE,
    IDENTITY_DIR,
    SPIFFE_ENDPOINT_SOCKET_ENV,
    WORKLOAD_API_DIR,
    WORKLOAD_API_SOCKET,
)
from meshtls.injection.target import (
    ENVOY_DATA_PLANE,
    ENVOY_SIDECAR_NAME,
    MESHTLS_PROXY_DATA_PLANE,
    SIDECAR_NAME,
    VOLUME_BUNDLE,
    VOLUME_CONFIG,
    VOLUME_IDENTITY,
    VOLUME_WORKLOAD_API,
    InjectionOptions,
    InjectionTarget,
)

SIDECAR_UID = 65532  # the conventional "nonroot" user of distroless images
READY_PATH = "/readyz"
PORT_NAME_PREFIX = "mtls-"
# The kubelet writes Secret files owned by root, group fsGroup when the pod sets one (and the sidecar, like every
# container of the pod, then has fsGroup as a supplementary group). Without fsGroup, owner and group are root, and
# a non-root sidecar can read the key only if it is world-readable; only the sidecar mounts the volume, so
# "world" is the sidecar container alone.
MODE_GROUP_READ = 0o440
MODE_ALL_READ = 0o444
# The Workload API socket: with fsGroup the kubelet makes the emptyDir group-owned by it and setgid, so the socket
# inherits the group every container of the pod has and 0660 reaches them all; without fsGroup the app containers may
# run as any uid, and the emptyDir (mounted by this pod's containers only) is the boundary: 0666.
SOCKET_MODE_GROUP = "0660"
SOCKET_MODE_POD = "0666"
WORKLOAD_API_SOCKET_PATH = f"{WORKLOAD_API_DIR}/{WORKLOAD_API_SOCKET}"
ALREADY_INJECTED = "meshtls: pod already injected ({}); left unchanged"


class PodShapeError(ValueError):
    """The pod is not shaped like a Pod: `field_path` has the wrong type."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path} {message}")
        self.field_path = field_path
        self.message = message


@dataclass(frozen=True)
class InjectionResult:
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    injected: bool = False


def escape_pointer_token(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901): `~` -> `~0`, then `/` -> `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


# --- reading a pod, strictly where we patch ---------------------------------------------------------------------

def _object_or_none(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PodShapeError(path, f"must be an object, not {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def pod_metadata(pod: Mapping[str, Any]) -> dict[str, Any]:
    return _object_or_none(pod.get("metadata"), "metadata") or {}


def pod_spec(pod: Mapping[str, Any]) -> dict[str, Any]:
    spec = _object_or_none(pod.get("spec"), "spec")
    if spec is None:
        raise PodShapeError("spec", "is missing")
    return spec


def _string_map(value: Any, path: str) -> dict[str, str]:
    mapping = _object_or_none(value, path) or {}
    for key, item in mapping.items():
        if not isinstance(item, str):
            raise PodShapeError(f"{path}[{key!r}]", f"must be a string, not {_type_name(item)}")
    return mapping


def pod_labels(pod: Mapping[str, Any]) -> dict[str, str]:
    return dict(_string_map(pod_metadata(pod).get("labels"), "metadata.labels"))


def pod_annotations(pod: Mapping[str, Any]) -> dict[str, str]:
    return dict(_string_map(pod_metadata(pod).get("annotations"), "metadata.annotations"))


def pod_service_account(pod: Mapping[str, Any]) -> str:
    """`spec.serviceAccountName`, else the deprecated `spec.serviceAccount`, else "default" (the API server's rule)."""
    spec = pod_spec(pod)
    for key in ("serviceAccountName", "serviceAccount"):
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            raise PodShapeError(f"spec.{key}", f"must be a string, not {_type_name(value)}")
        if value:
            return value
    return "default"


def _named_objects(spec: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """`spec.<key>` as a list of objects with string names ([] when absent or null)."""
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PodShapeError(f"spec.{key}", f"must be a list, not {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise PodShapeError(f"spec.{key}[{i}]", f"must be an object, not {_type_name(item)}")
        if not isinstance(item.get("name"), str):
            raise PodShapeError(f"spec.{key}[{i}].name", "must be a string")
    return value


def injected_marker(pod: Mapping[str, Any]) -> str | None:
    """Why this pod counts as injected already (a sidecar container, or our annotation); None if it does not."""
    spec = pod_spec(pod)
    for key in ("initContainers", "containers"):
        for name in (SIDECAR_NAME, ENVOY_SIDECAR_NAME):
            if any(c["name"] == name for c in _named_objects(spec, key)):
                return f"{key} has {name}"
    if ANNOTATION_INJECTED in pod_annotations(pod):
        return f"annotation {ANNOTATION_INJECTED} is set"
    return None


# --- what we add ------------------------------------------------------------------------------------------------

def _unique_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def _volumes(target: InjectionTarget, names: Mapping[str, str], identity_mode: int) -> list[dict[str, Any]]:
    socket = [{"name": names[VOLUME_WORKLOAD_API], "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}] \
        if target.workload_api else []
    return [
        {"name": names[VOLUME_IDENTITY],
         "secret": {"secretName": target.secret_name, "defaultMode": identity_mode}},
        {"name": names[VOLUME_BUNDLE],
         "configMap": {"name": target.bundle_config_map, "defaultMode": MODE_ALL_READ,
                       "items": [{"key": BUNDLE_FILE, "path": BUNDLE_FILE}, {"key": CRL_FILE, "path": CRL_FILE}]}},
        {"name": names[VOLUME_CONFIG],
         "configMap": {"name": target.config_map, "defaultMode": MODE_ALL_READ,
                       "items": [{"key": f, "path": f} for f in _config_files(target)]}},
        *socket,
    ]


def _config_files(target: InjectionTarget) -> tuple[str, ...]:
    return ENVOY_FILES if target.data_plane == ENVOY_DATA_PLANE else (CONFIG_FILE,)


def sidecar_name(target: InjectionTarget) -> str:
    return ENVOY_SIDECAR_NAME if target.data_plane == ENVOY_DATA_PLANE else SIDECAR_NAME


def _unique_ports(ports: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ports))


def sidecar_container(target: InjectionTarget, options: InjectionOptions,
                      volume_names: Mapping[str, str] | None = None, socket_mode: str = SOCKET_MODE_POD
                      ) -> dict[str, Any]:
    """The sidecar container of the target's data plane (`meshtls-proxy`, or `meshtls-envoy`: Envoy from the same
    image); `restartPolicy: Always` (a native sidecar) when options.native_sidecar. meshtls-proxy serves the Workload
    API itself; an Envoy pod gets `workload_api_container` beside it."""
    names = {VOLUME_IDENTITY: VOLUME_IDENTITY, VOLUME_BUNDLE: VOLUME_BUNDLE, VOLUME_CONFIG: VOLUME_CONFIG,
             VOLUME_WORKLOAD_API: VOLUME_WORKLOAD_API, **(volume_names or {})}
    envoy = target.data_plane == ENVOY_DATA_PLANE
    container: dict[str, Any] = {
        "name": sidecar_name(target),
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
    }
    if options.native_sidecar:
        container["restartPolicy"] = "Always"
    if envoy:
        container["command"] = envoy_container_command()
    else:
        container["command"] = [SIDECAR_NAME, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]
        if target.workload_api:
            container["command"] += ["--workload-api-socket", WORKLOAD_API_SOCKET_PATH,
                                     "--workload-api-socket-mode", socket_mode]
    ports = _unique_ports(target.inbound_ports)
    if ports:
        container["ports"] = [{"name": f"{PORT_NAME_PREFIX}{p}"[:15], "containerPort": p, "protocol": "TCP"}
                              for p in ports]
    container["volumeMounts"] = [
        {"name": names[VOLUME_IDENTITY], "mountPath": IDENTITY_DIR, "readOnly": True},
        {"name": names[VOLUME_BUNDLE], "mountPath": BUNDLE_DIR, "readOnly": True},
        {"name": names[VOLUME_CONFIG], "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    if target.workload_api and not envoy:
        container["volumeMounts"].append({"name": names[VOLUME_WORKLOAD_API], "mountPath": WORKLOAD_API_DIR})
    probe: dict[str, Any]
    if envoy:
        # Envoy's admin stays on 127.0.0.1 and its /ready ignores rejected SDS updates: an exec that compares the
        # certificate Envoy serves with the mounted one (meshtls.proxy.envoy_launcher)
        probe = {"exec": {"command": envoy_ready_command(target.admin_port)}}
    else:
        probe = {"httpGet": {"path": READY_PATH, "port": target.admin_port}}
    # started = certificate loaded: a native sidecar holds the app containers back until then (up to 2 minutes)
    container["startupProbe"] = {**probe, "periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 120}
    container["readinessProbe"] = {**probe, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    if envoy:  # SIGTERM stops Envoy at once: drain the inbound listeners first (meshtls-proxy drains on SIGTERM)
        container["lifecycle"] = {"preStop": {"exec": {"command": envoy_drain_command(target.admin_port)}}}
    requests = {k: v for k, v in (("cpu", options.cpu_request), ("memory", options.memory_request)) if v}
    memory_limit = options.envoy_memory_limit if envoy else options.memory_limit
    limits = {"memory": memory_limit} if memory_limit else {}
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    if resources:
        container["resources"] = resources
    container["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    return container


def _workload_api_patch(containers: list[dict[str, Any]], key: str, volume: str) -> tuple[list[dict[str, Any]],
                                                                                       list[str]]:
    """Mount the socket's emptyDir (read-only: the sidecar alone creates the socket) into each of `containers` and
    name it in SPIFFE_ENDPOINT_SOCKET; a container that already sets the variable or uses the path keeps its own."""
    patch: list[dict[str, Any]] = []
    warnings: list[str] = []
    for i, c in enumerate(containers):
        where = f"/spec/{key}/{i}"
        env = c.get("env")
        mounts = c.get("volumeMounts")
        if env is not None and not isinstance(env, list):
            raise PodShapeError(f"spec.{key}[{i}].env", f"must be a list, not {_type_name(env)}")
        if mounts is not None and not isinstance(mounts, list):
            raise PodShapeError(f"spec.{key}[{i}].volumeMounts", f"must be a list, not {_type_name(mounts)}")
        if any(isinstance(e, dict) and e.get("name") == SPIFFE_ENDPOINT_SOCKET_ENV for e in env or []):
            warnings.append(f"meshtls: container {c['name']} sets {SPIFFE_ENDPOINT_SOCKET_ENV} itself: left as it "
                            f"is, so it does not use meshtls's Workload API")
            continue
        if any(isinstance(m, dict) and m.get("mountPath") == WORKLOAD_API_DIR for m in mounts or []):
            warnings.append(f"meshtls: container {c['name']} mounts something at {WORKLOAD_API_DIR}: the Workload "
                            "API socket is not mounted there")
            continue
        mount = {"name": volume, "mountPath": WORKLOAD_API_DIR, "readOnly": True}
        variable = {"name": SPIFFE_ENDPOINT_SOCKET_ENV, "value": f"unix://{WORKLOAD_API_SOCKET_PATH}"}
        patch.append({"op": "add", "path": f"{where}/volumeMounts", "value": [mount]} if mounts is None else
                     {"op": "add", "path": f"{where}/volumeMounts/-", "value": mount})
        patch.append({"op": "add", "path": f"{where}/env", "value": [variable]} if env is None else
                     {"op": "add", "path": f"{where}/env/-", "value": variable})
    return patch, warnings


WORKLOAD_API_CONTAINER = "meshtls-workload-api"


def workload_api_container(target: InjectionTarget, options: InjectionOptions,
                           volume_names: Mapping[str, str] | None = None, socket_mode: str = SOCKET_MODE_POD
                           ) -> dict[str, Any]:
    """The Workload API alone (`meshtls-workload-api`), for a pod whose data plane is not meshtls-proxy (Envoy):
    the same image, reloader and server, no listeners; a native sidecar beside the data plane's. Where
    meshtls-proxy runs, `sidecar_container` serves the API itself and this container is not added."""
    names = {VOLUME_IDENTITY: VOLUME_IDENTITY, VOLUME_BUNDLE: VOLUME_BUNDLE,
             VOLUME_WORKLOAD_API: VOLUME_WORKLOAD_API, **(volume_names or {})}
    # shaped like a meshtls-proxy sidecar (its probe kind, memory limit, no preStop drain), without listeners
    plain = dataclasses.replace(target, data_plane=MESHTLS_PROXY_DATA_PLANE, inbound_ports=())
    container = sidecar_container(plain, options, volume_names, socket_mode)
    container["name"] = WORKLOAD_API_CONTAINER
    container["command"] = [WORKLOAD_API_CONTAINER, "--spiffe-id", target.spiffe_id,
                            "--admin-port", str(WORKLOAD_API_ADMIN_PORT),
                            "--workload-api-socket", WORKLOAD_API_SOCKET_PATH,
                            "--workload-api-socket-mode", socket_mode]
    container.pop("ports", None)
    container["volumeMounts"] = [
        {"name": names[VOLUME_IDENTITY], "mountPath": IDENTITY_DIR, "readOnly": True},
        {"name": names[VOLUME_BUNDLE], "mountPath": BUNDLE_DIR, "readOnly": True},
        {"name": names[VOLUME_WORKLOAD_API], "mountPath": WORKLOAD_API_DIR},
    ]
    probe = {"httpGet": {"path": READY_PATH, "port": WORKLOAD_API_ADMIN_PORT}}
    container["startupProbe"] = {**container["startupProbe"], **probe}
    container["readinessProbe"] = {**container["readinessProbe"], **probe}
    return container


def _declared_ports(containers: Iterable[Mapping[str, Any]]) -> dict[int, list[str]]:
    """containerPort -> names of the containers declaring it (lenient: these only feed warnings)."""
    found: dict[int, list[str]] = {}
    for c in containers:
        ports = c.get("ports")
        for p in ports if isinstance(ports, list) else []:
            port = p.get("containerPort") if isinstance(p, dict) else None
            if isinstance(port, int) and not isinstance(port, bool):
                found.setdefault(port, []).append(str(c.get("name")))
    return found


def injected_listeners(target: InjectionTarget) -> dict[int, str]:
    """Every port the containers meshtls injects listen on in the pod (outbound ones on 127.0.0.1, which an app
    container's listener on any address collides with too), and which container it is."""
    sidecar = f"{sidecar_name(target)} sidecar"
    listeners = {port: sidecar for port in _unique_ports([*target.inbound_ports, *target.outbound_ports])}
    listeners[target.admin_port] = sidecar
    if workload_api_beside(target):
        listeners[WORKLOAD_API_ADMIN_PORT] = f"{WORKLOAD_API_CONTAINER} container"
    return listeners


def workload_api_beside(target: InjectionTarget) -> bool:
    """Whether the pod gets the `meshtls-workload-api` container: the Workload API on, and a data plane that does
    not serve it itself (Envoy)."""
    return target.workload_api and target.data_plane == ENVOY_DATA_PLANE


def _warnings(pod_spec_: Mapping[str, Any], containers: list[dict[str, Any]], init_containers: list[dict[str, Any]],
              target: InjectionTarget, options: InjectionOptions) -> list[str]:
    warnings = []
    listeners = injected_listeners(target)
    ours = list(listeners)
    declared = _declared_ports([*init_containers, *containers])
    for port in ours:
        if port in declared:
            warnings.append(f"meshtls: container {', '.join(sorted(set(declared[port])))} declares port {port}, "
                            f"which the {listeners[port]} listens on; one of them will fail to bind")
    if pod_spec_.get("hostNetwork") is True:
        whose = "meshtls's containers' ports" if workload_api_beside(target) else "the sidecar's ports"
        warnings.append(f"meshtls: pod uses hostNetwork: {whose} ({', '.join(map(str, ours))}) "
                        "are opened on the node itself and shared with everything else there")
    if not options.native_sidecar and pod_spec_.get("restartPolicy") in ("Never", "OnFailure"):
        warnings.append(f"meshtls: the {sidecar_name(target)} sidecar is a regular container (native sidecars are "
                        f"off), so this restartPolicy {pod_spec_['restartPolicy']} pod will not complete while it runs")
    return warnings


def build_injection_patch(pod: Mapping[str, Any], target: InjectionTarget,
                          options: InjectionOptions) -> InjectionResult:
    """The JSON Patch that injects `target`'s sidecar into `pod`; empty (injected=False) if already injected."""
    if not isinstance(pod, Mapping):
        raise PodShapeError("object", f"must be a Pod object, not {_type_name(pod)}")
    metadata = _object_or_none(pod.get("metadata"), "metadata")
    annotations = _string_map((metadata or {}).get("annotations"), "metadata.annotations")
    spec = pod_spec(pod)
    containers = _named_objects(spec, "containers")
    init_containers = _named_objects(spec, "initContainers")
    volumes = _named_objects(spec, "volumes")
    marker = injected_marker(pod)
    if marker is not None:
        return InjectionResult([], [ALREADY_INJECTED.format(marker)], injected=False)

    patch: list[dict[str, Any]] = []

    taken = {v["name"] for v in volumes}
    names: dict[str, str] = {}
    for base in (VOLUME_IDENTITY, VOLUME_BUNDLE, VOLUME_CONFIG, VOLUME_WORKLOAD_API):
        names[base] = _unique_name(base, taken)
        taken.add(names[base])
    security = _object_or_none(spec.get("securityContext"), "spec.securityContext") or {}
    fs_group = security.get("fsGroup")
    has_fs_group = isinstance(fs_group, int) and not isinstance(fs_group, bool)
    new_volumes = _volumes(target, names, MODE_GROUP_READ if has_fs_group else MODE_ALL_READ)
    if spec.get("volumes") is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": new_volumes})
    else:
        patch.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in new_volumes)

    warnings: list[str] = []
    if target.workload_api:
        # before the sidecar is added, so the indices are the pod's own; init containers only when the native
        # sidecar starts before them (a plain one would start after them: they would wait for a socket forever)
        for key, group in (("containers", containers), *([("initContainers", init_containers)]
                                                          if options.native_sidecar else [])):
            added, said = _workload_api_patch(group, key, names[VOLUME_WORKLOAD_API])
            patch.extend(added)
            warnings.extend(said)
    container = sidecar_container(target, options, names, SOCKET_MODE_GROUP if has_fs_group else SOCKET_MODE_POD)
    if options.native_sidecar:  # first, so it runs before every other init container and the app
        if spec.get("initContainers") is None:
            patch.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
        else:
            patch.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
    elif spec.get("containers") is None:
        patch.append({"op": "add", "path": "/spec/containers", "value": [container]})
    else:
        patch.append({"op": "add", "path": "/spec/containers/-", "value": container})
    if workload_api_beside(target):  # Envoy does not serve the Workload API
        socket_mode = SOCKET_MODE_GROUP if has_fs_group else SOCKET_MODE_POD
        server = workload_api_container(target, options, names, socket_mode)
        where = "/spec/initContainers/1" if options.native_sidecar else "/spec/containers/-"
        patch.append({"op": "add", "path": where, "value": server})

    wanted = {ANNOTATION_INJECTED: target.identity_name, ANNOTATION_SPIFFE_ID: target.spiffe_id}
    if metadata is None:
        patch.append({"op": "add", "path": "/metadata", "value": {"annotations": wanted}})
    elif metadata.get("annotations") is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": wanted})
    else:
        for key, value in wanted.items():
            if annotations.get(key) != value:
                op = "replace" if key in annotations else "add"
                patch.append({"op": op, "path": f"/metadata/annotations/{escape_pointer_token(key)}",
                              "value": value})

    return InjectionResult(patch, _warnings(spec, containers, init_containers, target, options) + warnings,
                           injected=True)
