"""Envoy as the data plane on the real control plane (issue #15): chosen by the TrustDomain's default or the
identity, injected by meshtls's webhook, configured by the operator's ConfigMap, run for real by the harness's
kubelet (`PodSidecar` -> testsupport.envoy.EnvoyContainer), next to meshtls-proxy pods.

One trust domain (spec.sidecar.dataPlane: envoy, 20 s certificates so rotations come fast) and one namespace:
  client (Envoy)   --> server (Envoy)       HTTP echo and a gRPC echo behind it; allowed: client, mpclient
  mpclient (proxy) --> server (Envoy)       meshtls-proxy client -> Envoy server
  client (Envoy)   --> mpserver (proxy)     Envoy client -> meshtls-proxy server
  intruder (Envoy) --> server               not on the allow-list
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import random
import re
import socket
import ssl
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
from testsupport.envoy import EnvoyContainer

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.mesh import Mesh, grpc_echo_server, http_get
from e2e.operator_process import OperatorProcess, free_port
from e2e.podrunner import PodSidecar
from e2e.test_cli import meshtls
from meshtls.pki import generate_ca, issue_svid, workload_spiffe_id

GROUP, VERSION = "meshtls.dev", "v1alpha1"
SHORT = {"minTTL": "10s", "defaultTTL": "20s", "maxTTL": "30s"}
IDENTITY_DIR, BUNDLE_DIR = "/var/run/meshtls/identity", "/var/run/meshtls/bundle"
PQ_GROUP = "X25519MLKEM768"


def proxy_group(sidecar: PodSidecar) -> str:
    """The group a meshtls-proxy sidecar gets with Envoy: from the image, its OpenSSL 3.5 offers X25519MLKEM768 first
    (e2e/test_image.py proves it with the image's own openssl); from the venv, this interpreter's OpenSSL decides,
    and below 3.5 (no ML-KEM) both fall back to X25519 (also proven on loopback in tests/test_envoy_process.py)."""
    if sidecar.runtime.name == "image":
        return PQ_GROUP
    return PQ_GROUP if ssl.OPENSSL_VERSION_INFO >= (3, 5) else "X25519"
ENVOY_PODS = ("server", "client", "intruder")
PROXY_PODS = ("mpserver", "mpclient")


@dataclass
class EnvoyMesh:
    mesh: Mesh
    trust_domain: str
    namespace: str
    ports: dict[str, int]

    def sidecar(self, name: str) -> PodSidecar:
        return self.mesh.sidecars[f"{self.namespace}/{name}"]

    def envoy(self, name: str) -> EnvoyContainer:
        process = self.sidecar(name).process
        assert isinstance(process, EnvoyContainer), f"{name} does not run Envoy"
        return process

    def spiffe(self, sa: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{sa}"


@pytest.fixture(scope="module")
def envoy_mesh(kube: Kube, kube_api: client.ApiClient, operator: OperatorProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyMesh]:
    if not operator.running:
        operator.start()
    td = f"envoy-{uuid.uuid4().hex[:6]}.meshtls.test"
    kube.create_trust_domain(td, {"certificates": SHORT, "ca": {"propagationDelay": "5s"},
                                  "sidecar": {"dataPlane": "envoy"}})
    wait_for("the TrustDomain to be Ready", lambda: is_ready(kube.trust_domain(td)), 30)
    mesh = Mesh(kube, kube_api, tmp_path_factory.mktemp("envoy-pods"))
    try:
        ns = mesh.namespace("e2e-envoy")
        ports = {name: free_port() for name in (
            "server_tls", "grpc_tls", "app", "grpc_app", "client_out", "client_grpc_out", "client_mp_out",
            "mpserver_tls", "mpclient_out", "intruder_out")}
        env = EnvoyMesh(mesh, td, ns, ports)
        server = env.spiffe("server")
        mesh.identity(ns, "server", {
            "trustDomain": td, "inbound": [{"port": ports["server_tls"], "appPort": ports["app"]},
                                           {"port": ports["grpc_tls"], "appPort": ports["grpc_app"]}],
            "allowedPeers": [env.spiffe("client"), env.spiffe("mpclient")]})
        mesh.identity(ns, "client", {"trustDomain": td, "outbound": [
            {"listenPort": ports["client_out"], "address": f"127.0.0.1:{ports['server_tls']}", "peer": server},
            {"listenPort": ports["client_grpc_out"], "address": f"127.0.0.1:{ports['grpc_tls']}", "peer": server},
            {"listenPort": ports["client_mp_out"], "address": f"127.0.0.1:{ports['mpserver_tls']}",
             "peer": env.spiffe("mpserver")}]})
        mesh.identity(ns, "intruder", {"trustDomain": td, "outbound": [
            {"listenPort": ports["intruder_out"], "address": f"127.0.0.1:{ports['server_tls']}", "peer": server}]})
        mesh.identity(ns, "mpserver", {"trustDomain": td, "dataPlane": "meshtls-proxy",
                                       "inbound": [{"port": ports["mpserver_tls"], "appPort": ports["app"]}],
                                       "allowedPeers": [env.spiffe("client")]})
        mesh.identity(ns, "mpclient", {"trustDomain": td, "dataPlane": "meshtls-proxy", "outbound": [
            {"listenPort": ports["mpclient_out"], "address": f"127.0.0.1:{ports['server_tls']}", "peer": server}]})
        mesh.echo_app(ports["app"])
        grpc_app = grpc_echo_server(ports["grpc_app"])
        try:
            for name in (*ENVOY_PODS, *PROXY_PODS):
                mesh.pod(ns, name)
            yield env
        finally:
            grpc_app.stop(0)
    finally:
        mesh.close()
        try:
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, "trustdomains", td)
        except client.exceptions.ApiException:
            pass


def curves(metrics: str, family: str) -> dict[str, float]:
    """Envoy's per-curve handshake counters (`envoy_listener_ssl_curves` or `envoy_cluster_ssl_curves`) by group,
    summed over listeners or clusters, from its Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(family + "{"):
            group = re.search(r'envoy_ssl_curve="([^"]+)"', line)
            if group:
                out[group.group(1)] = out.get(group.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def grows(before: dict[str, float], after: dict[str, float]) -> set[str]:
    return {g for g, v in after.items() if v > before.get(g, 0)}


def s_client(openssl: str, port: int, cert: Path | None, key: Path | None, ca: Path) -> str:
    args = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca), "-quiet"]
    if cert and key:
        args += ["-cert", str(cert), "-key", str(key)]
    result = subprocess.run(args, input="GET /openssl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            capture_output=True, text=True, timeout=20)
    return result.stdout


def test_each_pod_gets_the_data_plane_its_identity_resolves_to(envoy_mesh: EnvoyMesh, kube: Kube,
                                                               cluster: Cluster) -> None:
    """The TrustDomain's default (envoy) for most; the identity's own choice (meshtls-proxy) wins for two."""
    for name in (*ENVOY_PODS, *PROXY_PODS):
        plane = "envoy" if name in ENVOY_PODS else "meshtls-proxy"
        assert (kube.identity(envoy_mesh.namespace, name) or {})["status"]["dataPlane"] == plane
        sidecar = envoy_mesh.sidecar(name)
        assert sidecar.container.name == ("meshtls-envoy" if plane == "envoy" else "meshtls-proxy")
        config = kube.configmap_data(envoy_mesh.namespace, f"{name}-meshtls-proxy") or {}
        assert ("envoy.yaml" in config) == (plane == "envoy") and "proxy.yaml" in config
    # what a platform engineer sees: the real CLI against the real API server
    shown = meshtls(cluster, "status", "-n", envoy_mesh.namespace, "-o", "json")
    assert shown.returncode == 0, shown.stderr
    planes = {row["name"]: row["dataPlane"] for row in json.loads(shown.stdout)["items"]}
    assert all(planes[n] == ("envoy" if n in ENVOY_PODS else "meshtls-proxy") for n in (*ENVOY_PODS, *PROXY_PODS)), \
        planes
    for name in ENVOY_PODS:  # the injected exec readiness probe, run as the kubelet does
        result = envoy_mesh.envoy(name).ready()
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("value", ["istio", "Envoy", ""])
def test_the_api_server_refuses_an_unknown_data_plane_naming_the_field(envoy_mesh: EnvoyMesh, kube: Kube,
                                                                        value: str) -> None:
    with pytest.raises(client.exceptions.ApiException) as caught:
        kube.create_identity(envoy_mesh.namespace, "typo", {"serviceAccountName": "typo", "dataPlane": value})
    assert caught.value.status == 422 and "spec.dataPlane" in str(caught.value.body), caught.value.body
    with pytest.raises(client.exceptions.ApiException) as caught:
        kube.custom.create_cluster_custom_object(GROUP, VERSION, "trustdomains", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TrustDomain", "metadata": {"name": "typo.meshtls.test"},
            "spec": {"sidecar": {"dataPlane": value}}})
    assert caught.value.status == 422 and "spec.sidecar.dataPlane" in str(caught.value.body), caught.value.body


def test_switching_the_data_plane_rewrites_the_configmap_and_the_status(envoy_mesh: EnvoyMesh, kube: Kube) -> None:
    ns = envoy_mesh.namespace
    envoy_mesh.mesh.identity(ns, "switcher", {"trustDomain": envoy_mesh.trust_domain,
                                              "inbound": [{"port": free_port(), "appPort": free_port()}]})

    def shown(plane: str) -> bool:
        status = (kube.identity(ns, "switcher") or {}).get("status", {})
        config = kube.configmap_data(ns, "switcher-meshtls-proxy") or {}
        return status.get("dataPlane") == plane and ("envoy.yaml" in config) == (plane == "envoy") \
            and "proxy.yaml" in config

    wait_for("the TrustDomain's default, envoy", lambda: shown("envoy"), 15)
    kube.patch_identity(ns, "switcher", {"spec": {"dataPlane": "meshtls-proxy"}})
    wait_for("the identity's own choice, meshtls-proxy", lambda: shown("meshtls-proxy"), 15)
    kube.patch_identity(ns, "switcher", {"spec": {"dataPlane": None}})
    wait_for("back to the TrustDomain's default", lambda: shown("envoy"), 15)


def test_envoy_to_envoy_negotiates_the_hybrid_post_quantum_group(envoy_mesh: EnvoyMesh) -> None:
    server, client_ = envoy_mesh.envoy("server"), envoy_mesh.envoy("client")
    before_server = curves(server.metrics(), "envoy_listener_ssl_curves")
    before_client = curves(client_.metrics(), "envoy_cluster_ssl_curves")
    assert http_get(envoy_mesh.ports["client_out"], "/pq") == (200, b"echo /pq")
    server_groups = grows(before_server, curves(server.metrics(), "envoy_listener_ssl_curves"))
    client_groups = grows(before_client, curves(client_.metrics(), "envoy_cluster_ssl_curves"))
    print(f"Envoy<->Envoy negotiated: server {sorted(server_groups)}, client {sorted(client_groups)}")
    assert server_groups == {PQ_GROUP} and client_groups == {PQ_GROUP}


def test_mixed_pairs_work_over_the_best_group_the_proxy_has(envoy_mesh: EnvoyMesh) -> None:
    """meshtls-proxy client -> Envoy server, and Envoy client -> meshtls-proxy server: the hybrid post-quantum group
    where the proxy's OpenSSL has it (the image), else a classical fallback (OpenSSL 3.0), and traffic flows."""
    server, client_ = envoy_mesh.envoy("server"), envoy_mesh.envoy("client")
    before = curves(server.metrics(), "envoy_listener_ssl_curves")
    assert http_get(envoy_mesh.ports["mpclient_out"], "/proxy-to-envoy") == (200, b"echo /proxy-to-envoy")
    inbound_groups = grows(before, curves(server.metrics(), "envoy_listener_ssl_curves"))
    before = curves(client_.metrics(), "envoy_cluster_ssl_curves")
    assert http_get(envoy_mesh.ports["client_mp_out"], "/envoy-to-proxy") == (200, b"echo /envoy-to-proxy")
    outbound_groups = grows(before, curves(client_.metrics(), "envoy_cluster_ssl_curves"))
    print(f"mixed pairs negotiated: proxy->Envoy {sorted(inbound_groups)}, Envoy->proxy {sorted(outbound_groups)}")
    assert inbound_groups == {proxy_group(envoy_mesh.sidecar("mpclient"))}
    assert outbound_groups == {proxy_group(envoy_mesh.sidecar("mpserver"))}


def test_strangers_are_refused_and_an_allowed_certificate_gets_through(envoy_mesh: EnvoyMesh, tmp_path: Path,
                                                                        openssl: str) -> None:
    port = envoy_mesh.ports["server_tls"]
    server = envoy_mesh.envoy("server")
    denied = server.stats().get(f"inbound_{port}.rbac.denied", 0)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):  # same CA, not on the allow-list
        http_get(envoy_mesh.ports["intruder_out"], "/sneak", timeout=5)
    wait_for("the intruder denied by RBAC", lambda: server.stats().get(f"inbound_{port}.rbac.denied", 0) > denied, 5)

    identity = envoy_mesh.sidecar("client").host_path(IDENTITY_DIR)
    bundle = envoy_mesh.sidecar("server").host_path(BUNDLE_DIR) / "ca.crt"
    assert "echo /openssl" in s_client(openssl, port, identity / "tls.crt", identity / "tls.key", bundle)
    assert "echo /openssl" not in s_client(openssl, port, None, None, bundle)  # no certificate
    other_ca = generate_ca(envoy_mesh.trust_domain, dt.datetime.now(dt.UTC))  # another CA, the allowed SPIFFE ID
    forged = issue_svid(other_ca, workload_spiffe_id(envoy_mesh.trust_domain, envoy_mesh.namespace, "client"),
                        dt.datetime.now(dt.UTC), dt.timedelta(hours=1))
    (tmp_path / "f.crt").write_bytes(forged.cert_chain_pem)
    (tmp_path / "f.key").write_bytes(forged.key_pem)
    assert "echo /openssl" not in s_client(openssl, port, tmp_path / "f.crt", tmp_path / "f.key", bundle)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:  # plain TCP
        plain.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        plain.settimeout(5)
        try:
            data = plain.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert b"echo /plain" not in data


def serials(kube: Kube, ns: str, names: tuple[str, ...]) -> dict[str, str]:
    return {n: (kube.identity(ns, n) or {})["status"]["serialNumber"] for n in names}


def test_a_large_message_crosses_envoys_32k_buffers_both_ways(envoy_mesh: EnvoyMesh) -> None:
    """The rendered per-connection buffer limit (32 KiB) is flow control, not a size cap: 3 MiB up and 3 MiB back in
    one gRPC call through the client's and the server's Envoy (gRPC's default message limit is 4 MiB)."""
    payload = random.Random(15).randbytes(3 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{envoy_mesh.ports['client_grpc_out']}") as channel:
        say = channel.unary_unary("/meshtls.Echo/Say")
        assert say(payload, timeout=60) == b"echo " + payload
    _, dump = envoy_mesh.envoy("server").get("/config_dump")
    assert b'"per_connection_buffer_limit_bytes": 32768' in dump


def test_a_grpc_bidi_stream_opened_before_a_rotation_keeps_flowing(envoy_mesh: EnvoyMesh, kube: Kube) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{envoy_mesh.ports['client_grpc_out']}")
    say = channel.unary_unary("/meshtls.Echo/Say")
    assert say(b"hi", timeout=10) == b"echo hi"
    chat = channel.stream_stream("/meshtls.Echo/Chat")
    outbox: list[bytes] = []
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        while not done.is_set():
            outbox.append(f"m{len(outbox)}".encode())
            yield outbox[-1]
            time.sleep(0.2)

    before = serials(kube, envoy_mesh.namespace, ("server", "client"))
    replies: list[bytes] = []
    rotated = False
    deadline = time.monotonic() + 60
    stream = chat(requests(), timeout=120)
    for reply in stream:
        replies.append(reply)
        now = serials(kube, envoy_mesh.namespace, ("server", "client"))
        rotated = all(now[n] != before[n] for n in before)
        if (rotated and len(replies) > 10) or time.monotonic() > deadline:
            done.set()
            break
    stream.cancel()
    print(f"gRPC stream: {len(replies)} replies across the rotation of both Envoys' certificates")
    assert rotated, "no rotation of both identities within 60 s"
    assert replies == [b"echo " + m for m in outbox[:len(replies)]]
    assert say(b"after", timeout=10) == b"echo after"
    channel.close()


def phase(kube: Kube, td: str) -> str:
    return str(kube.trust_domain(td).get("status", {}).get("rotation", {}).get("phase", ""))


def test_5000_requests_across_rotations_and_a_ca_rotation_have_no_failure(envoy_mesh: EnvoyMesh,
                                                                           kube: Kube) -> None:
    """Round robin over Envoy->Envoy, proxy->Envoy and Envoy->proxy while certificates rotate every ~13 s and the
    trust domain's CA is rotated once (new CA in every bundle, signing switched, old CA retired)."""
    ns, td = envoy_mesh.namespace, envoy_mesh.trust_domain
    paths = [envoy_mesh.ports[p] for p in ("client_out", "mpclient_out", "client_mp_out")]
    names = ("server", "client", "mpserver", "mpclient")

    def rotations() -> int:
        return sum(int((kube.identity(ns, n) or {})["status"].get("rotations", 0)) for n in names)

    old_ca = kube.trust_domain(td)["status"]["caFingerprint"]
    start_rotations = rotations()
    failures: list[str] = []
    count = 0
    ca_rotated = False
    started = time.monotonic()
    kube.custom.patch_cluster_custom_object(GROUP, VERSION, "trustdomains", td,
                                            {"metadata": {"annotations": {"meshtls.dev/rotate-ca": "e2e-envoy"}}})
    while count < 5000 or rotations() - start_rotations < 5 or not ca_rotated:
        try:
            status, body = http_get(paths[count % 3], f"/r{count}")
            if (status, body) != (200, f"echo /r{count}".encode()):
                failures.append(f"{count} via {paths[count % 3]}: {status} {body[:40]!r}")
        except Exception as exc:
            failures.append(f"{count} via {paths[count % 3]}: {exc!r}")
        count += 1
        if count % 200 == 0:
            status_ = kube.trust_domain(td).get("status", {})
            ca_rotated = status_.get("caFingerprint") != old_ca and phase(kube, td) == "Stable"
        if time.monotonic() - started > 150:
            break
    done = rotations() - start_rotations
    print(f"{count} requests, {done} certificate rotations, CA rotated: {ca_rotated}, {len(failures)} failures "
          f"in {time.monotonic() - started:.0f} s")
    assert not failures, failures[:10]
    assert count >= 5000 and done >= 5 and ca_rotated
    for name in ENVOY_PODS:  # every Envoy serves the certificate mounted now, after all of that
        result = envoy_mesh.envoy(name).ready()
        assert result.returncode == 0, result.stderr
        assert envoy_mesh.envoy(name).stats().get("sds.identity.update_rejected", 0) == 0


def keep_alive_get(conn: ssl.SSLSocket, path: str) -> bytes:
    """One HTTP/1.1 request on an open connection; the echo app's body."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {head!r}")
        head += chunk
    header, _, body = head.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", header, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += conn.recv(4096)
    return body


def test_a_deleted_identity_is_refused_by_envoy_within_10s(envoy_mesh: EnvoyMesh, kube: Kube, tmp_path: Path,
                                                            openssl: str) -> None:
    """New handshakes of the revoked certificate are refused within 10 s; a connection it opened before goes on
    (Envoy has no per-connection cut: the gap documented in docs/envoy.md, measured here)."""
    identity = envoy_mesh.sidecar("client").host_path(IDENTITY_DIR)
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_bytes((identity / "tls.crt").read_bytes())
    key.write_bytes((identity / "tls.key").read_bytes())
    bundle = envoy_mesh.sidecar("server").host_path(BUNDLE_DIR) / "ca.crt"
    port = envoy_mesh.ports["server_tls"]
    assert "echo /openssl" in s_client(openssl, port, cert, key, bundle)
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    context.load_cert_chain(cert, key)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as open_conn:
        assert keep_alive_get(open_conn, "/before") == b"echo /before"
        started = time.monotonic()
        kube.delete_identity(envoy_mesh.namespace, "client")
        wait_for("the deleted client's certificate to be refused by Envoy",
                 lambda: "echo /openssl" not in s_client(openssl, port, cert, key, bundle), 10, interval=0.2)
        delay = time.monotonic() - started
        print(f"revoked certificate refused by Envoy {delay:.2f} s after its identity was deleted")
        assert delay < 10
        time.sleep(2)
        assert keep_alive_get(open_conn, "/after") == b"echo /after"
        print(f"a connection opened before the revocation still flows {time.monotonic() - started:.1f} s after it "
              "(Envoy: new handshakes only)")
