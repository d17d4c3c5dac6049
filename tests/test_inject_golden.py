"""Golden tests of sidecar injection, through the whole admission path, plus direct tests of the pod patch.

Each case in tests/golden/inject is `<case>.in.yaml` (the pod being created), `<case>.targets.yaml` (what the
identity lookup returns, the request's namespace, and InjectionOptions overrides) and `<case>.out.yaml` (the
admission outcome as header comments, then the pod after applying the returned JSON Patch).
`MESHTLS_UPDATE_GOLDEN=1 pytest tests/test_inject_golden.py` rewrites the outputs; otherwise any difference fails
with a unified diff.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from testsupport.golden import assert_golden

from meshtls.api.constants import ANNOTATION_INJECTED, ANNOTATION_SPIFFE_ID
from meshtls.api.ports import SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.envoy import ENVOY_FILES, envoy_arguments
from meshtls.dataplane.layout import BUNDLE_DIR, CONFIG_DIR, CONFIG_FILE, IDENTITY_DIR, WORKLOAD_API_DIR
from meshtls.injection.admission import AdmissionOutcome, review_pod_admission
from meshtls.injection.inject import (
    WORKLOAD_API_CONTAINER,
    PodShapeError,
    build_injection_patch,
    escape_pointer_token,
)
from meshtls.injection.target import ENVOY_SIDECAR_NAME, SIDECAR_NAME, InjectionOptions, InjectionTarget

GOLDEN = Path(__file__).parent / "golden" / "inject"
CASES = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))


# --- a strict RFC 6902 applier for the two operations the injector uses -----------------------------------------

class PatchError(Exception):
    pass


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise PatchError(f"path {path!r} is not a JSON Pointer")
    *parents, last = (_unescape(t) for t in path[1:].split("/"))
    node = doc
    for token in parents:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and (token == "0" or not token.startswith("0")) \
                and int(token) < len(node):
            node = node[int(token)]
        else:
            raise PatchError(f"{path}: {token!r} does not exist")
    return node, last


def apply_json_patch(doc: Any, patch: Any) -> Any:
    """A copy of `doc` with `patch` applied; PatchError for anything RFC 6902 would refuse (or an op besides add
    and replace, which the injector must never send)."""
    if not isinstance(patch, list):
        raise PatchError("a JSON Patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in patch:
        if not isinstance(op, dict) or set(op) != {"op", "path", "value"} or op["op"] not in ("add", "replace"):
            raise PatchError(f"unexpected operation {op!r}")
        if op["path"] == "":
            doc = copy.deepcopy(op["value"])
            continue
        node, last = _parent(doc, op["path"])
        value = copy.deepcopy(op["value"])
        if isinstance(node, dict):
            if op["op"] == "replace" and last not in node:
                raise PatchError(f"replace {op['path']}: no such member")
            node[last] = value
        elif isinstance(node, list):
            if op["op"] == "add" and last == "-":
                node.append(value)
                continue
            if not last.isdigit() or (last != "0" and last.startswith("0")):
                raise PatchError(f"{op['path']}: {last!r} is not an array index")
            index = int(last)
            if op["op"] == "add" and index <= len(node):
                node.insert(index, value)
            elif op["op"] == "replace" and index < len(node):
                node[index] = value
            else:
                raise PatchError(f"{op['path']}: index out of range")
        else:
            raise PatchError(f"{op['path']}: parent is neither an object nor an array")
    return doc


def test_applier_is_strict() -> None:
    doc = {"a": {"b~/c": 1}, "l": [1, 2]}
    assert apply_json_patch(doc, [{"op": "add", "path": "/a/b~0~1c", "value": 2}]) == {"a": {"b~/c": 2}, "l": [1, 2]}
    assert apply_json_patch(doc, [{"op": "add", "path": "/l/0", "value": 0}])["l"] == [0, 1, 2]
    assert apply_json_patch(doc, [{"op": "add", "path": "/l/-", "value": 3}])["l"] == [1, 2, 3]
    for bad in ([{"op": "add", "path": "/x/y", "value": 1}], [{"op": "replace", "path": "/a/zz", "value": 1}],
                [{"op": "add", "path": "/l/3", "value": 1}], [{"op": "remove", "path": "/a"}],
                [{"op": "add", "path": "/l/01", "value": 1}], [{"op": "add", "path": "a", "value": 1}]):
        with pytest.raises(PatchError):
            apply_json_patch(doc, bad)
    assert doc == {"a": {"b~/c": 1}, "l": [1, 2]}


# --- running a case ---------------------------------------------------------------------------------------------

def admission_review(pod: Any, namespace: str | None = "shop", uid: str = "7f0c1b1e-0000-4000-8000-000000000001",
                     operation: str = "CREATE", **request: Any) -> bytes:
    req: dict[str, Any] = {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                           "resource": {"group": "", "version": "v1", "resource": "pods"},
                           "operation": operation, "object": pod, **request}
    if namespace is not None:
        req["namespace"] = namespace
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}).encode()


def patch_of(outcome: AdmissionOutcome) -> list[dict[str, Any]]:
    response = outcome.response["response"]
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"], validate=True))
    return patch


@dataclass
class Lookup:
    targets: list[InjectionTarget]
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, namespace: str, service_account: str) -> list[InjectionTarget]:
        self.calls.append((namespace, service_account))
        return list(self.targets)  # verbatim, even other ServiceAccounts': the reviewer must filter


def target_from(data: dict[str, Any]) -> InjectionTarget:
    data = dict(data)
    data["inbound_ports"] = tuple(data.get("inbound_ports", ()))
    return InjectionTarget(**data)


@dataclass
class Case:
    pod: dict[str, Any]
    lookup: Lookup
    options: InjectionOptions
    namespace: str


def load_case(name: str) -> Case:
    pod = yaml.safe_load((GOLDEN / f"{name}.in.yaml").read_text())
    setup = yaml.safe_load((GOLDEN / f"{name}.targets.yaml").read_text()) or {}
    return Case(pod, Lookup([target_from(t) for t in setup.get("targets") or []]),
                InjectionOptions(**(setup.get("options") or {})), setup.get("namespace", "shop"))


def admit(case: Case, pod: dict[str, Any] | None = None) -> tuple[AdmissionOutcome, dict[str, Any]]:
    pod = case.pod if pod is None else pod
    outcome = review_pod_admission(admission_review(pod, case.namespace), case.lookup, case.options)
    assert outcome.http_status == 200, outcome.response
    assert outcome.response["response"]["uid"] == "7f0c1b1e-0000-4000-8000-000000000001"
    return outcome, apply_json_patch(pod, patch_of(outcome))


def render(name: str, case: Case, outcome: AdmissionOutcome, patched: dict[str, Any]) -> str:
    response = outcome.response["response"]
    lines = [f"# golden output of {name}.in.yaml (regenerate with MESHTLS_UPDATE_GOLDEN=1)"]
    lines += [f"# lookup: namespace={ns} serviceAccount={sa}" for ns, sa in case.lookup.calls]
    lines.append(f"# allowed: {str(response['allowed']).lower()}")
    if not response["allowed"]:
        lines.append(f"# denied: {response['status']['message']}")
    patch = patch_of(outcome)
    lines += [f"# patch: {op['op']} {op['path']}" for op in patch] or ["# patch: none (pod unchanged)"]
    lines += [f"# warning: {w}" for w in response.get("warnings", [])]
    if outcome.event is not None:
        lines.append(f"# event: {outcome.event[0]}: {outcome.event[1]}")
    return "\n".join(lines) + "\n" + yaml.safe_dump(patched, sort_keys=False, width=200)


def test_enough_cases() -> None:
    assert len(CASES) >= 12, CASES
    for name in CASES:
        assert (GOLDEN / f"{name}.targets.yaml").is_file(), f"{name}.targets.yaml is missing"


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    case = load_case(name)
    outcome, patched = admit(case)
    text = render(name, case, outcome, patched)
    assert_golden(GOLDEN / f"{name}.out.yaml", text)


@pytest.mark.parametrize("name", CASES)
def test_golden_output_is_a_fixed_point(name: str) -> None:
    """Re-admitting the output (or applying the same decision again) changes nothing."""
    case = load_case(name)
    _, once = admit(case)
    outcome, twice = admit(case, once)
    assert patch_of(outcome) == []
    assert twice == once
    assert outcome.response["response"]["allowed"] is True


def without_workload_api(container: dict[str, Any]) -> dict[str, Any]:
    """The container as the pod had it: the socket's mount and SPIFFE_ENDPOINT_SOCKET taken out again."""
    out = dict(container)
    for key, ours in (("volumeMounts", lambda m: m.get("mountPath") == WORKLOAD_API_DIR and m.get("readOnly")),
                      ("env", lambda e: e.get("value") == f"unix://{WORKLOAD_API_DIR}/agent.sock")):
        if key in out:
            kept = [x for x in out[key] if not ours(x)]
            if kept:
                out[key] = kept
            else:  # the injector added the list (no pod in the corpus has an empty one)
                del out[key]
    return out


@pytest.mark.parametrize("name", CASES)
def test_golden_invariants(name: str) -> None:
    case = load_case(name)
    outcome, patched = admit(case)
    patch = patch_of(outcome)
    assert case.pod == load_case(name).pod, "the reviewer must not modify the request's pod"
    assert {op["op"] for op in patch} <= {"add", "replace"}
    if not patch:
        assert patched == case.pod
        return
    spec = patched["spec"]
    envoy = all(t.data_plane == "envoy" for t in case.lookup.targets)
    name = ENVOY_SIDECAR_NAME if envoy else SIDECAR_NAME
    sidecars = [c for c in [*spec.get("initContainers", []), *spec["containers"]]
                if c["name"] in (SIDECAR_NAME, ENVOY_SIDECAR_NAME)]
    assert [c["name"] for c in sidecars] == [name]
    sidecar = sidecars[0]
    if case.options.native_sidecar:
        assert spec["initContainers"][0] is sidecar and sidecar["restartPolicy"] == "Always"
    else:
        assert spec["containers"][-1] is sidecar and "restartPolicy" not in sidecar
    # everything the pod had is still there, in order
    ours = {m["name"] for m in sidecar["volumeMounts"]}
    for key in ("containers", "initContainers", "volumes"):
        before = case.pod["spec"].get(key) or []
        after = [without_workload_api(x) if key != "volumes" else x for x in spec.get(key) or []
                 if x is not sidecar and x.get("name") != WORKLOAD_API_CONTAINER
                 and not (key == "volumes" and x["name"] in ours)]
        assert after == before, key
    for key, value in (case.pod["metadata"].get("annotations") or {}).items():
        if key != ANNOTATION_SPIFFE_ID:
            assert patched["metadata"]["annotations"][key] == value
    volume_names = [v["name"] for v in spec["volumes"]]
    assert len(volume_names) == len(set(volume_names))
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    socket = mounts.pop(WORKLOAD_API_DIR, None)
    assert set(mounts) == {IDENTITY_DIR, BUNDLE_DIR, CONFIG_DIR}
    assert all(m["readOnly"] and m["name"] in volume_names for m in mounts.values())
    config_volume = next(v for v in spec["volumes"] if v["name"] == mounts[CONFIG_DIR]["name"])
    items = [i["key"] for i in config_volume["configMap"]["items"]]
    command = [SIDECAR_NAME, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]
    servers = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == WORKLOAD_API_CONTAINER]
    if envoy:  # Envoy's launcher, its files only, an exec probe (the admin stays on loopback) and a preStop drain
        assert socket is None  # Envoy serves no Workload API: the meshtls-workload-api container beside it does
        if any(t.workload_api for t in case.lookup.targets):
            (server,) = servers
            socket = next(m for m in server["volumeMounts"] if m["mountPath"] == WORKLOAD_API_DIR)
            assert server["command"][0] == WORKLOAD_API_CONTAINER and "lifecycle" not in server
            assert server["readinessProbe"]["httpGet"]["path"] == "/readyz" and "exec" not in server["readinessProbe"]
            if case.options.native_sidecar:
                assert spec["initContainers"][1] is server and server["restartPolicy"] == "Always"
        else:
            assert servers == []
        assert sidecar["command"] == ["meshtls-envoy", "run", *envoy_arguments()]
        assert items == list(ENVOY_FILES)
        for probe in ("startupProbe", "readinessProbe"):
            assert sidecar[probe]["exec"]["command"][:2] == ["meshtls-envoy", "ready"]
        assert sidecar["lifecycle"]["preStop"]["exec"]["command"][:2] == ["meshtls-envoy", "drain"]
    else:
        assert servers == []  # meshtls-proxy serves the Workload API itself
        assert items == [CONFIG_FILE] and "lifecycle" not in sidecar
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        if socket is None:
            assert sidecar["command"] == command
        else:
            assert sidecar["command"][:5] == [*command, "--workload-api-socket", f"{WORKLOAD_API_DIR}/agent.sock"]
    if socket is not None:  # the server alone writes the socket's emptyDir; every app container that got it reads it
        assert not socket.get("readOnly") and socket["name"] in volume_names
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            app_mounts = [m for m in c.get("volumeMounts") or [] if m["name"] == socket["name"]]
            if c is not sidecar and c["name"] != WORKLOAD_API_CONTAINER and app_mounts:
                assert app_mounts == [{"name": socket["name"], "mountPath": WORKLOAD_API_DIR, "readOnly": True}]
                assert {"name": "SPIFFE_ENDPOINT_SOCKET", "value": f"unix://{WORKLOAD_API_DIR}/agent.sock"} in c["env"]
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and not sc["allowPrivilegeEscalation"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    annotations = patched["metadata"]["annotations"]
    assert annotations[ANNOTATION_INJECTED] and annotations[ANNOTATION_SPIFFE_ID].startswith("spiffe://")


# --- the patch itself, directly ---------------------------------------------------------------------------------

TARGET = InjectionTarget(
    identity_name="backend", service_account="backend", spiffe_id="spiffe://demo.meshtls.local/ns/shop/sa/backend",
    secret_name="backend-mtls", config_map="backend-meshtls-proxy", bundle_config_map="meshtls-bundle",
    pod_selector={"app": "backend"}, inbound_ports=(8443,),
)


def pod(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "backend", "namespace": "shop", "labels": {"app": "backend"}},
            "spec": {"serviceAccountName": "backend", "containers": [{"name": "app", "image": "nginx"}], **spec}}


def test_fifty_containers() -> None:
    p = pod(containers=[{"name": f"c{i}", "image": "busybox", "ports": [{"containerPort": 9000 + i}]}
                        for i in range(50)])
    for native in (True, False):
        result = build_injection_patch(p, TARGET, InjectionOptions(native_sidecar=native))
        patched = apply_json_patch(p, result.patch)
        assert result.injected and result.warnings == []
        containers = patched["spec"]["containers"]
        assert len(containers) == (50 if native else 51)
        assert [c["name"] for c in containers[:50]] == [f"c{i}" for i in range(50)]
        assert build_injection_patch(patched, TARGET, InjectionOptions()).patch == []


def test_many_volume_name_clashes_never_clobber() -> None:
    taken = ["meshtls-identity", "meshtls-identity-1", "meshtls-identity-2", "meshtls-bundle", "meshtls-config-1"]
    p = pod(volumes=[{"name": n, "emptyDir": {}} for n in taken])
    result = build_injection_patch(p, TARGET, InjectionOptions())
    patched = apply_json_patch(p, result.patch)
    names = [v["name"] for v in patched["spec"]["volumes"]]
    assert names == [*taken, "meshtls-identity-3", "meshtls-bundle-1", "meshtls-config"]
    mounts = {m["mountPath"]: m["name"] for m in patched["spec"]["initContainers"][0]["volumeMounts"]}
    assert mounts == {IDENTITY_DIR: "meshtls-identity-3", BUNDLE_DIR: "meshtls-bundle-1",
                      CONFIG_DIR: "meshtls-config"}
    assert all(v == {"name": n, "emptyDir": {}} for v, n in zip(patched["spec"]["volumes"], taken, strict=False))


def test_patch_paths_are_escaped_pointers() -> None:
    p = pod()
    p["metadata"]["annotations"] = {"a/b": "c"}
    result = build_injection_patch(p, TARGET, InjectionOptions())
    paths = [op["path"] for op in result.patch]
    assert "/metadata/annotations/meshtls.dev~1injected-identity" in paths
    assert "/metadata/annotations/meshtls.dev~1spiffe-id" in paths
    assert escape_pointer_token("a~/b") == "a~0~1b"


def test_preset_spiffe_id_annotation_is_replaced() -> None:
    p = pod()
    p["metadata"]["annotations"] = {ANNOTATION_SPIFFE_ID: "spiffe://evil.example/ns/x/sa/y"}
    result = build_injection_patch(p, TARGET, InjectionOptions())
    assert {"op": "replace", "path": "/metadata/annotations/meshtls.dev~1spiffe-id",
            "value": TARGET.spiffe_id} in result.patch
    assert apply_json_patch(p, result.patch)["metadata"]["annotations"][ANNOTATION_SPIFFE_ID] == TARGET.spiffe_id


def test_pod_without_metadata_or_null_fields() -> None:
    p = {"spec": {"containers": [{"name": "app"}], "volumes": None, "initContainers": None}}
    result = build_injection_patch(p, TARGET, InjectionOptions())
    patched = apply_json_patch(p, result.patch)
    assert patched["metadata"] == {"annotations": {ANNOTATION_INJECTED: "backend",
                                                   ANNOTATION_SPIFFE_ID: TARGET.spiffe_id}}
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [SIDECAR_NAME]
    assert len(patched["spec"]["volumes"]) == 3


def test_already_injected_is_empty() -> None:
    for p in (pod(initContainers=[{"name": SIDECAR_NAME}]), pod(containers=[{"name": "a"}, {"name": SIDECAR_NAME}])):
        result = build_injection_patch(p, TARGET, InjectionOptions())
        assert result.patch == [] and not result.injected
        assert any("already injected" in w for w in result.warnings)
    p = pod()
    p["metadata"]["annotations"] = {ANNOTATION_INJECTED: "backend"}
    assert build_injection_patch(p, TARGET, InjectionOptions()).patch == []


def test_build_does_not_mutate_the_pod() -> None:
    p = pod(volumes=[{"name": "meshtls-identity", "emptyDir": {}}], hostNetwork=True)
    before = copy.deepcopy(p)
    result = build_injection_patch(p, TARGET, InjectionOptions())
    assert p == before
    apply_json_patch(p, result.patch)
    assert p == before


def test_port_names_and_options() -> None:
    target = InjectionTarget("a", "a", "spiffe://t/ns/n/sa/a", "s", "c", "b", inbound_ports=(8443, 65535, 8443),
                             admin_port=15091)
    options = InjectionOptions(image="registry.local/meshtls:9", image_pull_policy="Always", cpu_request="",
                               memory_request="16Mi", memory_limit="")
    result = build_injection_patch(pod(), target, options)
    sidecar = apply_json_patch(pod(), result.patch)["spec"]["initContainers"][0]
    assert sidecar["image"] == "registry.local/meshtls:9" and sidecar["imagePullPolicy"] == "Always"
    assert sidecar["ports"] == [{"name": "mtls-8443", "containerPort": 8443, "protocol": "TCP"},
                                {"name": "mtls-65535", "containerPort": 65535, "protocol": "TCP"}]
    assert all(len(p["name"]) <= 15 for p in sidecar["ports"])
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15091}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15091}
    assert sidecar["resources"] == {"requests": {"memory": "16Mi"}}


@pytest.mark.parametrize("data_plane", ["meshtls-proxy", "envoy"])
@pytest.mark.parametrize("workload_api", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_app_ports_on_meshtls_listeners_are_warned_about_per_container(data_plane: str, workload_api: bool,
                                                                      native: bool) -> None:
    """An app container declaring a port one of meshtls's containers listens on (inbound, outbound, admin) gets one
    warning per port, naming the container that listens there; 15091 only when the meshtls-workload-api container
    is injected."""
    target = dataclasses.replace(TARGET, data_plane=data_plane, workload_api=workload_api, outbound_ports=(15001,))
    declared = [8443, 15001, SIDECAR_ADMIN_PORT, WORKLOAD_API_ADMIN_PORT, 8080]
    p = pod(containers=[{"name": "app", "image": "nginx", "ports": [{"containerPort": x} for x in declared]}])
    result = build_injection_patch(p, target, InjectionOptions(native_sidecar=native))
    sidecar = ENVOY_SIDECAR_NAME if data_plane == "envoy" else SIDECAR_NAME
    beside = data_plane == "envoy" and workload_api
    # the outbound listener is on the sidecar's 127.0.0.1, where the app's listener on any address collides too
    expected = {8443: f"{sidecar} sidecar", 15001: f"{sidecar} sidecar", SIDECAR_ADMIN_PORT: f"{sidecar} sidecar"}
    if beside:
        expected[WORKLOAD_API_ADMIN_PORT] = f"{WORKLOAD_API_CONTAINER} container"
    port_warnings = [w for w in result.warnings if "declares port" in w]
    assert port_warnings == [f"meshtls: container app declares port {port}, which the {who} listens on; one of them "
                             "will fail to bind" for port, who in expected.items()], result.warnings
    patched = apply_json_patch(p, result.patch)
    names = [c["name"] for c in patched["spec"].get("initContainers", []) + patched["spec"]["containers"]]
    assert (WORKLOAD_API_CONTAINER in names) == beside
    host = build_injection_patch(pod(hostNetwork=True), target, InjectionOptions(native_sidecar=native))
    (note,) = [w for w in host.warnings if "hostNetwork" in w]
    assert f"({', '.join(map(str, expected))})" in note, note


def test_fs_group_tightens_the_key_mode() -> None:
    with_fs = pod(securityContext={"fsGroup": 2000})
    vols = apply_json_patch(with_fs, build_injection_patch(with_fs, TARGET, InjectionOptions()).patch)["spec"]
    assert vols["volumes"][0]["secret"]["defaultMode"] == 0o440
    without = apply_json_patch(pod(), build_injection_patch(pod(), TARGET, InjectionOptions()).patch)["spec"]
    assert without["volumes"][0]["secret"]["defaultMode"] == 0o444


@pytest.mark.parametrize("spec, field_path", [
    ({"containers": "app"}, "spec.containers"),
    ({"containers": [{"name": "app"}], "volumes": {"name": "x"}}, "spec.volumes"),
    ({"containers": [{"name": "app"}], "initContainers": ["x"]}, "spec.initContainers[0]"),
    ({"containers": [{"image": "x"}]}, "spec.containers[0].name"),
    ({"containers": [{"name": "app"}], "securityContext": []}, "spec.securityContext"),
])
def test_wrong_types_raise_naming_the_field(spec: dict[str, Any], field_path: str) -> None:
    with pytest.raises(PodShapeError) as info:
        build_injection_patch({"metadata": {}, "spec": spec}, TARGET, InjectionOptions())
    assert info.value.field_path == field_path
