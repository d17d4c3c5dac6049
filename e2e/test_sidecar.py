"""Real traffic through real sidecars with the operator's certificates (issue #5's acceptance).

Pods are admitted by the real API server, injected by meshtls's webhook; `PodSidecar` plays the kubelet: it mounts
each pod's Secret and ConfigMaps (atomic `..data` swaps, re-synced from the API) and runs the injected command.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.mesh import EchoHandler, EchoServer, grpc_echo_server, http_get
from e2e.operator_process import OperatorProcess, free_port
from e2e.podrunner import PodSidecar
from meshtls.pki import generate_ca, issue_svid, workload_spiffe_id

TTL = "20s"


@dataclass
class Mesh:
    namespace: str
    trust_domain: str
    ports: dict[str, int]
    sidecars: dict[str, PodSidecar]
    workdir: Path

    def spiffe(self, sa: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{sa}"

    def get(self, via: str, path: str = "/hello", timeout: float = 5) -> tuple[int, bytes]:
        return http_get(self.ports[via], path, timeout)


def _pod(name: str, sa: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "example/app"}]}}


@pytest.fixture(scope="module")
def mesh(cluster: Cluster, kube: Kube, kube_api: client.ApiClient, trust_domain: str, operator: OperatorProcess,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    if not operator.running:
        operator.start()
    core = client.CoreV1Api(kube_api)
    ns = f"e2e-mesh-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=ns, labels={"meshtls.dev/inject": "enabled", "e2e": "true"})))
    ports = {name: free_port() for name in ("server_tls", "server_app", "grpc_tls", "grpc_app", "client_out",
                                            "client_grpc_out", "intruder_out")}
    server_id = f"spiffe://{trust_domain}/ns/{ns}/sa/server"
    kube.create_identity(ns, "server", {
        "serviceAccountName": "server", "trustDomain": trust_domain, "ttl": TTL,
        "inbound": [{"port": ports["server_tls"], "appPort": ports["server_app"]},
                    {"port": ports["grpc_tls"], "appPort": ports["grpc_app"]}],
        "allowedPeers": [f"spiffe://{trust_domain}/ns/{ns}/sa/client"]})
    kube.create_identity(ns, "client", {
        "serviceAccountName": "client", "trustDomain": trust_domain, "ttl": TTL,
        "outbound": [{"listenPort": ports["client_out"], "address": f"127.0.0.1:{ports['server_tls']}",
                      "peer": server_id},
                     {"listenPort": ports["client_grpc_out"], "address": f"127.0.0.1:{ports['grpc_tls']}",
                      "peer": server_id}]})
    kube.create_identity(ns, "intruder", {
        "serviceAccountName": "intruder", "trustDomain": trust_domain,
        "outbound": [{"listenPort": ports["intruder_out"], "address": f"127.0.0.1:{ports['server_tls']}",
                      "peer": server_id}]})
    for name in ("server", "client", "intruder"):
        core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
        wait_for(f"{name} Ready", lambda n=name: is_ready(kube.identity(ns, n)), 15)
        wait_for(f"{name}'s sidecar config", lambda n=name: kube.configmap_data(ns, f"{n}-meshtls-proxy"), 10)
    app = EchoServer(("127.0.0.1", ports["server_app"]), EchoHandler)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    grpc_app = grpc_echo_server(ports["grpc_app"])
    workdir = tmp_path_factory.mktemp("pods")
    sidecars: dict[str, PodSidecar] = {}
    try:
        for name in ("server", "client", "intruder"):
            core.create_namespaced_pod(ns, _pod(name, name))
            pod = core.read_namespaced_pod(name, ns)
            sidecars[name] = PodSidecar(kube_api, pod, workdir)
            sidecars[name].start()
        yield Mesh(ns, trust_domain, {**ports, "client": ports["client_out"], "intruder": ports["intruder_out"]},
                   sidecars, workdir)
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()
        app.shutdown()
        grpc_app.stop(0)
        core.delete_namespace(ns, propagation_policy="Background")


def test_pods_were_injected_by_the_webhook(mesh: Mesh) -> None:
    for name, sidecar in mesh.sidecars.items():
        annotations = sidecar.pod.metadata.annotations or {}
        assert annotations.get("meshtls.dev/injected-identity") == name
        assert sidecar.container.name == "meshtls-proxy"


def test_request_through_both_sidecars_and_the_server_logs_the_client(mesh: Mesh) -> None:
    status, body = mesh.get("client", "/through-the-mesh")
    assert (status, body) == (200, b"echo /through-the-mesh")
    server = mesh.sidecars["server"].process
    assert server is not None
    server.wait_for_log(mesh.spiffe("client"), timeout=5)


def test_a_peer_not_on_the_allow_list_is_refused(mesh: Mesh) -> None:
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        mesh.get("intruder", "/sneak")
    server = mesh.sidecars["server"].process
    assert server is not None
    log = server.wait_for_log(mesh.spiffe("intruder"), timeout=5)
    line = next(line for line in log.splitlines() if mesh.spiffe("intruder") in line)
    assert "allow" in line.lower() or "reject" in line.lower() or "denied" in line.lower(), line


def _s_client(openssl: str, port: int, files: dict[str, Path] | None, ca: Path) -> subprocess.CompletedProcess[str]:
    args = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-quiet"]
    if files:
        args += ["-cert", str(files["cert"]), "-key", str(files["key"])]
    return subprocess.run(args, input="GET /openssl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                          capture_output=True, text=True, timeout=20)


def test_openssl_with_an_allowed_certificate_gets_through_and_strangers_do_not(
    mesh: Mesh, tmp_path: Path, openssl: str
) -> None:
    identity = mesh.sidecars["client"].host_path("/var/run/meshtls/identity")
    ca = mesh.sidecars["server"].host_path("/var/run/meshtls/bundle") / "ca.crt"
    allowed = {"cert": identity / "tls.crt", "key": identity / "tls.key"}
    ok = _s_client(openssl, mesh.ports["server_tls"], allowed, ca)
    assert "200 OK" in ok.stdout and "echo /openssl" in ok.stdout, ok.stdout + ok.stderr
    no_cert = _s_client(openssl, mesh.ports["server_tls"], None, ca)
    assert "echo /openssl" not in no_cert.stdout
    other_ca = generate_ca(mesh.trust_domain, dt.datetime.now(dt.UTC))
    forged = issue_svid(other_ca, workload_spiffe_id(mesh.trust_domain, mesh.namespace, "client"),
                        dt.datetime.now(dt.UTC), dt.timedelta(hours=1))
    (tmp_path / "f.crt").write_bytes(forged.cert_chain_pem)
    (tmp_path / "f.key").write_bytes(forged.key_pem)
    stranger = _s_client(openssl, mesh.ports["server_tls"], {"cert": tmp_path / "f.crt", "key": tmp_path / "f.key"},
                         ca)
    assert "echo /openssl" not in stranger.stdout


def test_plain_tcp_is_refused(mesh: Mesh) -> None:
    with socket.create_connection(("127.0.0.1", mesh.ports["server_tls"]), timeout=5) as s:
        s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert b"echo /plain" not in data and b"200 OK" not in data


def test_grpc_unary_and_a_bidi_stream_survive_a_rotation(mesh: Mesh, kube: Kube) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.ports['client_grpc_out']}")
    say = channel.unary_unary("/meshtls.Echo/Say")
    assert say(b"hi", timeout=10) == b"echo hi"
    chat = channel.stream_stream("/meshtls.Echo/Chat")
    outbox: list[bytes] = []
    sent = threading.Event()
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        i = 0
        while not done.is_set():
            i += 1
            outbox.append(f"m{i}".encode())
            yield outbox[-1]
            sent.set()
            time.sleep(0.2)

    serials_before = {n: kube.identity(mesh.namespace, n)["status"]["serialNumber"]  # type: ignore[index]
                      for n in ("server", "client")}
    replies: list[bytes] = []
    stream = chat(requests(), timeout=120)
    deadline = time.monotonic() + 60
    for reply in stream:
        replies.append(reply)
        rotated = all(kube.identity(mesh.namespace, n)["status"]["serialNumber"] != s  # type: ignore[index]
                      for n, s in serials_before.items())
        if (rotated and len(replies) > 10) or time.monotonic() > deadline:
            done.set()
            break
    stream.cancel()
    assert rotated, "no rotation of both identities within 60 s"
    assert replies == [b"echo " + m for m in outbox[: len(replies)]]
    assert say(b"after", timeout=10) == b"echo after"
    channel.close()


def test_5000_requests_across_5_rotations_have_no_failure(mesh: Mesh, kube: Kube) -> None:
    def rotations() -> int:
        return sum(int(kube.identity(mesh.namespace, n)["status"].get("rotations", 0))  # type: ignore[index]
                   for n in ("server", "client"))

    start_rotations = rotations()
    failures: list[str] = []
    count = 0
    started = time.monotonic()
    while count < 5000 or rotations() - start_rotations < 5:
        try:
            status, body = mesh.get("client", f"/r{count}")
            if status != 200 or body != f"echo /r{count}".encode():
                failures.append(f"{count}: {status} {body[:40]!r}")
        except Exception as exc:
            failures.append(f"{count}: {exc!r}")
        count += 1
        if time.monotonic() - started > 240:
            break
    done_rotations = rotations() - start_rotations
    print(f"{count} requests, {done_rotations} rotations (server+client), {len(failures)} failures "
          f"in {time.monotonic() - started:.0f} s")
    assert not failures, failures[:10]
    assert count >= 5000 and done_rotations >= 5


def test_deleted_client_is_refused_within_10s_by_the_crl(mesh: Mesh, kube: Kube, tmp_path: Path, openssl: str) -> None:
    identity = mesh.sidecars["client"].host_path("/var/run/meshtls/identity")
    (tmp_path / "c.crt").write_bytes((identity / "tls.crt").read_bytes())
    (tmp_path / "c.key").write_bytes((identity / "tls.key").read_bytes())
    ca = mesh.sidecars["server"].host_path("/var/run/meshtls/bundle") / "ca.crt"
    files = {"cert": tmp_path / "c.crt", "key": tmp_path / "c.key"}
    assert "echo /openssl" in _s_client(openssl, mesh.ports["server_tls"], files, ca).stdout
    started = time.monotonic()
    kube.delete_identity(mesh.namespace, "client")
    wait_for("the last client certificate to be refused",
             lambda: "echo /openssl" not in _s_client(openssl, mesh.ports["server_tls"], files, ca).stdout, 10,
             interval=0.2)
    delay = time.monotonic() - started
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        mesh.get("client", "/after-revocation")  # the client's own sidecar still holds the revoked certificate
    print(f"revoked certificate refused {delay:.2f} s after deletion")
