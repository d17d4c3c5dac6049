"""The SPIFFE Workload API in injected pods, judged by the SPIFFE project's own clients (issue #18).

Pods are admitted by the real API server and injected by meshtls's webhook; `PodSidecar` plays the kubelet (the
Secret and ConfigMaps written the kubelet's way, the socket's emptyDir a directory, the injected command run for
real). The apps are py-spiffe (`WorkloadApiClient`, `X509Source`) in a Python process and a go-spiffe v2 program
(e2e/spiffeapp, built here with `go build`), each given only the SPIFFE_ENDPOINT_SOCKET the webhook set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from kubernetes import client
from spiffe._proto import workload_pb2

from e2e.kube_helpers import Kube, wait_for
from e2e.mesh import Mesh
from e2e.operator_process import OperatorProcess, free_port
from e2e.podrunner import PodSidecar
from meshtls.pki import load_certificates, load_private_key_pem

GROUP, VERSION = "meshtls.dev", "v1alpha1"
HERE = Path(__file__).resolve().parent
SPIFFEAPP = HERE / "spiffeapp"
SHORT = {"minTTL": "10s", "defaultTTL": "20s", "maxTTL": "30s"}
SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
HEADER = (("workload.spiffe.io", "true"),)


# --- the go-spiffe program ----------------------------------------------------------------------------------------


def build_spiffeapp() -> Path:
    """`go build` e2e/spiffeapp once per source version, into ~/.cache/meshtls (fails, never skips, without go)."""
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        pytest.fail("the go toolchain is needed to build the go-spiffe judge (e2e/spiffeapp): install Go >= 1.24")
    digest = hashlib.sha256(b"".join((SPIFFEAPP / n).read_bytes() for n in ("go.mod", "go.sum", "main.go")))
    out = Path.home() / ".cache" / "meshtls" / "bin" / f"spiffeapp-{digest.hexdigest()[:12]}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([go, "build", "-o", str(out) + ".tmp", "."], cwd=SPIFFEAPP, capture_output=True,
                                text=True, timeout=900, env={**os.environ, "CGO_ENABLED": "0"})
        if result.returncode != 0:
            pytest.fail(f"go build of e2e/spiffeapp failed:\n{result.stderr[-3000:]}")
        os.replace(str(out) + ".tmp", out)
    return out


@dataclass
class App:
    """A process of an app container: its stdout's JSON lines collected as they come."""

    name: str
    process: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.raw.append(line)
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("event") == kind]

    def last(self, kind: str) -> dict[str, Any]:
        found = self.events(kind)
        return found[-1] if found else {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def output(self) -> str:
        return "".join(self.raw[-40:])


def run_app(name: str, command: list[str], pod: PodSidecar) -> App:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV} | pod.app_env()
    assert env[SOCKET_ENV].startswith("unix:///"), env[SOCKET_ENV]
    return App(name, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True))


# --- py-spiffe in an app process ---------------------------------------------------------------------------------

PY_FETCH = """
import json
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from spiffe import WorkloadApiClient
with WorkloadApiClient() as client:  # SPIFFE_ENDPOINT_SOCKET, as the webhook set it
    svid = client.fetch_x509_svid(timeout=20)
    print(json.dumps({"event": "svid", "id": str(svid.spiffe_id),
                      "chain": [c.public_bytes(Encoding.DER).hex() for c in svid.cert_chain],
                      "key": svid.private_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()).hex()}))
"""

# An X509Source held for as long as the test runs: every 0.2 s the SVID it returns must chain to the bundle it
# returns for the SVID's trust domain and be within its validity (checked with meshtls.pki.verify_svid).
PY_SOURCE = """
import datetime as dt, json, sys, time
from cryptography.hazmat.primitives import hashes
from spiffe import X509Source
from meshtls.pki import verify_svid
source = X509Source(timeout_in_seconds=20)
checks, last = 0, None
while True:
    context = source.get_x509_context()
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    now = dt.datetime.now(dt.UTC)
    roots = list(bundle.x509_authorities) if bundle else []
    leaf = svid.leaf
    result = verify_svid(list(svid.cert_chain), roots, now)
    checks += 1
    state = (format(leaf.serial_number, "x"), sorted(r.fingerprint(hashes.SHA256()).hex()[:16] for r in roots))
    if not result.ok or not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        print(json.dumps({"event": "bad", "serial": state[0], "why": result.reason or "outside validity",
                          "roots": state[1]}), flush=True)
    if state != last:
        print(json.dumps({"event": "state", "serial": state[0], "roots": state[1], "checks": checks}), flush=True)
        last = state
    time.sleep(0.2)
"""


# --- the mesh of this module -----------------------------------------------------------------------------------------


@dataclass
class World:
    kube: Kube
    mesh: Mesh
    td: str
    ns: str
    pods: dict[str, PodSidecar]

    def spiffe_id(self, name: str) -> str:
        return f"spiffe://{self.td}/ns/{self.ns}/sa/{name}"

    def socket(self, name: str) -> str:
        return self.pods[name].app_env()[SOCKET_ENV]

    def serial(self, name: str) -> str:
        return str((self.kube.identity(self.ns, name) or {}).get("status", {}).get("serialNumber", ""))

    def rotations(self, name: str) -> int:
        return int((self.kube.identity(self.ns, name) or {}).get("status", {}).get("rotations", 0))


@pytest.fixture(scope="module")
def world(kube: Kube, kube_api: client.ApiClient, operator: OperatorProcess,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not operator.running:
        operator.start()
    td = f"wlapi-{uuid.uuid4().hex[:6]}.meshtls.test"
    # the trust domain turns the Workload API on for its identities; "plain" opts out
    kube.create_trust_domain(td, {"certificates": SHORT, "ca": {"propagationDelay": "3s"},
                                  "workloadAPI": {"enabled": True}})
    mesh = Mesh(kube, kube_api, tmp_path_factory.mktemp("wlapi"))
    pods: dict[str, PodSidecar] = {}
    try:
        ns = mesh.namespace("e2e-wlapi")
        for name in ("listener", "dialer", "stranger", "pyapp"):
            mesh.identity(ns, name, {"trustDomain": td})
        mesh.identity(ns, "plain", {"trustDomain": td, "workloadAPI": {"enabled": False},
                                    "outbound": [{"listenPort": free_port(), "address": "127.0.0.1:1",
                                                  "peer": f"spiffe://{td}/ns/{ns}/sa/listener"}]})
        for name in ("listener", "dialer", "stranger", "pyapp", "plain"):
            pods[name] = mesh.pod(ns, name)
        yield World(kube, mesh, td, ns, pods)
    finally:
        mesh.close()
        kube.delete_trust_domain(td)


def secret_material(world: World, name: str) -> tuple[str, list[str], str]:
    data = world.kube.secret_data(world.ns, f"{name}-mtls") or {}
    chain = [c for c in load_certificates(data["tls.crt"]) if c.issuer != c.subject]
    key = load_private_key_pem(data["tls.key"]).private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return format(chain[0].serial_number, "x"), [c.public_bytes(Encoding.DER).hex() for c in chain], key.hex()


def raw_call(socket: str, method: str = "FetchX509SVID", metadata: Any = HEADER) -> tuple[Any, Any]:
    """(first message, None) or (None, the gRPC error) of a raw call, as protobuf parses it."""
    reply = workload_pb2.X509SVIDResponse if method == "FetchX509SVID" else workload_pb2.X509BundlesResponse
    with grpc.insecure_channel(socket.replace("unix://", "unix:", 1)) as channel:
        call = channel.unary_stream(f"/SpiffeWorkloadAPI/{method}", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=reply.FromString)
        stream = call(workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=15)
        try:
            return next(stream), None
        except grpc.RpcError as exc:
            return None, exc
        finally:
            stream.cancel()


# --- the tests ------------------------------------------------------------------------------------------------------


def test_the_webhook_gives_app_containers_the_socket_and_only_when_enabled(world: World) -> None:
    for name in ("listener", "pyapp"):
        pod = world.pods[name]
        assert pod.app_env()[SOCKET_ENV].endswith("/agent.sock")
        assert "--workload-api-socket" in pod.container.command
        assert {v.name for v in pod.pod.spec.volumes if v.empty_dir is not None} == {"meshtls-workload-api"}
    plain = world.pods["plain"]
    assert SOCKET_ENV not in plain.app_env() and "--workload-api-socket" not in plain.container.command
    socket = world.socket("pyapp").removeprefix("unix://")
    wait_for("the socket", lambda: os.path.exists(socket), 10)
    assert os.stat(socket).st_mode & 0o777 == 0o666  # no fsGroup: the pod's emptyDir is the boundary


def test_py_spiffe_fetches_the_svid_the_secret_holds(world: World) -> None:
    for _attempt in range(3):  # a rotation may land between the fetch and the Secret read
        app = run_app("py-fetch", [sys.executable, "-c", PY_FETCH], world.pods["pyapp"])
        assert app.process.wait(60) == 0, app.output()
        wait_for("the fetch's output", lambda a=app: a.events("svid"), 5)
        got = app.last("svid")
        serial, chain, key = secret_material(world, "pyapp")
        if format(x509.load_der_x509_certificate(bytes.fromhex(got["chain"][0])).serial_number, "x") == serial:
            break
    assert got["id"] == world.spiffe_id("pyapp")
    assert got["chain"] == chain
    assert got["key"] == key


def test_py_spiffe_x509_source_holds_across_rotations_and_a_ca_rotation(world: World) -> None:
    app = run_app("py-source", [sys.executable, "-c", PY_SOURCE], world.pods["pyapp"])
    try:
        wait_for("the source's first state", lambda: app.events("state"), 30)
        start = world.rotations("pyapp")
        wait_for("3 rotations of pyapp", lambda: world.rotations("pyapp") - start >= 3, 90, interval=0.5)
        before = set(app.last("state")["roots"])
        world.kube.custom.patch_cluster_custom_object(GROUP, VERSION, "trustdomains", world.td, {
            "metadata": {"annotations": {"meshtls.dev/rotate-ca": f"wlapi-{uuid.uuid4().hex[:4]}"}}})
        wait_for("the source to see the old CA retired", lambda: (app.last("state").get("roots") or [])
                 and not set(app.last("state")["roots"]) & before, 120, interval=0.5)
        wait_for("a rotation under the new CA", lambda: len({e["serial"] for e in app.events("state")}) >= 5, 60)
    finally:
        app.stop()
    states = app.events("state")
    serials = {e["serial"] for e in states}
    root_sets = {tuple(e["roots"]) for e in states}
    checks = states[-1]["checks"] if states else 0
    print(f"py-spiffe X509Source: {len(serials)} SVIDs, {len(root_sets)} bundle states, {checks} checks, "
          f"{len(app.events('bad'))} bad")
    assert not app.events("bad"), app.events("bad")[:5]
    assert len(serials) >= 4 and len(root_sets) >= 3  # old CA, old+new, new


def test_go_spiffe_mtls_across_rotations_refuses_a_stranger_and_follows_revocation(world: World) -> None:
    binary = str(build_spiffeapp())
    port = free_port()
    listener = run_app("listener", [binary, "listen", "-addr", f"127.0.0.1:{port}",
                                    "-allow", world.spiffe_id("dialer")], world.pods["listener"])
    dialer: App | None = None
    try:
        wait_for("the listener", lambda: listener.events("listening"), 30)
        dialer = run_app("dialer", [binary, "dial", "-addr", f"127.0.0.1:{port}", "-server",
                                    world.spiffe_id("listener"), "-interval", "5ms"], world.pods["dialer"])
        starts = {n: world.rotations(n) for n in ("listener", "dialer")}

        def progress() -> dict[str, Any]:
            assert dialer is not None
            return dialer.last("progress")

        wait_for(">= 2000 requests and 3 rotations of both", lambda: progress().get("ok", 0) >= 2000 and all(
            world.rotations(n) - starts[n] >= 3 for n in starts), 180, interval=0.5)
        before = progress()
        rotations = {n: world.rotations(n) - starts[n] for n in starts}
        assert before["failed"] == 0, dialer.output()

        stranger = subprocess.run([binary, "dial", "-addr", f"127.0.0.1:{port}", "-server",
                                   world.spiffe_id("listener"), "-count", "3"], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, **world.pods["stranger"].app_env()})
        assert stranger.returncode == 1, stranger.stdout + stranger.stderr
        assert json.loads(stranger.stdout.splitlines()[-1])["failed"] == 3
        wait_for("the listener to log the stranger refused", lambda: any(
            e["peer"] == world.spiffe_id("stranger") and e["why"] == "not allowed"
            for e in listener.events("refused")), 10)

        deleted_at = time.time()
        world.kube.delete_identity(world.ns, "dialer")

        def first_failure_after_deletion() -> dict[str, Any] | None:
            assert dialer is not None
            return next((e for e in dialer.events("failure") if e["t"] >= deleted_at), None)

        first = wait_for("the dialer's new connections to fail", first_failure_after_deletion, 30, interval=0.1)
        delay = first["t"] - deleted_at
        time.sleep(2)
        after = progress()
        time.sleep(2)
        later = progress()
        print(f"go-spiffe: {before['ok']} requests, rotations listener={rotations['listener']} "
              f"dialer={rotations['dialer']} (SVIDs seen by the dialer: {before['serials']}), "
              f"{before['failed']} failed before deletion; revocation delay {delay:.2f} s; "
              f"stranger refused 3/3")
        assert delay < 10, f"new connections still succeeded {delay:.1f} s after the deletion"
        assert later["ok"] == after["ok"] and later["failed"] > after["failed"], (after, later)  # none since
        assert any(e["why"] == "revoked" for e in listener.events("refused"))
        # the dialer's pod is no longer entitled to an SVID: the spec's PermissionDenied, not stale material
        message, error = raw_call(world.socket("dialer"))
        assert message is None and error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    finally:
        listener.stop()
        if dialer is not None:
            dialer.stop()


def test_the_spec_errors(world: World, tmp_path: Path, kube_api: client.ApiClient) -> None:
    socket = world.socket("pyapp")
    for metadata in (None, (("workload.spiffe.io", "True"),)):
        message, error = raw_call(socket, metadata=metadata)
        assert message is None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    message, error = raw_call(socket, "FetchX509Bundles", metadata=None)
    assert message is None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    # a second identity's socket: a sidecar of "stranger" with listener's Secret mounted serves nothing
    pod = world.kube.core.read_namespaced_pod("stranger", world.ns)
    misfit = PodSidecar(kube_api, pod, tmp_path)
    identity_dir = misfit.mounts["/var/run/meshtls/identity"][2]
    misfit.mounts["/var/run/meshtls/identity"] = ("secret", "listener-mtls", identity_dir)
    misfit.start()
    try:
        sock = misfit.translate(world.pods["stranger"].container.command[
            world.pods["stranger"].container.command.index("--workload-api-socket") + 1])
        wait_for("the misfit's socket", lambda: os.path.exists(sock), 10)
        message, error = raw_call("unix://" + sock)
        assert message is None and error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert world.spiffe_id("listener") in error.details() and world.spiffe_id("stranger") in error.details()
    finally:
        misfit.stop()
    # JWT: Unimplemented, saying why
    with grpc.insecure_channel(socket.replace("unix://", "unix:", 1)) as channel:
        fetch = channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=workload_pb2.JWTSVIDResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            fetch(workload_pb2.JWTSVIDRequest(audience=["db"]), metadata=HEADER, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "JWT" in err.value.details()  # type: ignore[attr-defined]
    # the sidecar's metrics count what was refused
    metrics = world.pods["pyapp"].process.metrics()  # type: ignore[union-attr]
    assert 'meshtls_proxy_workload_api_refusals_total{rpc="FetchX509SVID",code="INVALID_ARGUMENT"}' in metrics
    assert "meshtls_proxy_workload_api_serving 1" in metrics
