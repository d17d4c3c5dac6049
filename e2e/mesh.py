"""Building blocks for e2e suites with real traffic: namespaces, identities, injected pods, apps, requests."""

from __future__ import annotations

import http.client
import http.server
import socketserver
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from kubernetes import client

from e2e.kube_helpers import Kube, is_ready, wait_for
from e2e.podrunner import PodSidecar


class EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"echo {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class EchoServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def grpc_echo_server(port: int) -> grpc.Server:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo " + request

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield b"echo " + r

    handler = grpc.method_handlers_generic_handler("meshtls.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def http_get(port: int, path: str = "/hello", timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Mesh:
    """Creates what a test needs and removes all of it on close()."""

    def __init__(self, kube: Kube, api: client.ApiClient, workdir: Path) -> None:
        self.kube = kube
        self.api = api
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.sidecars: dict[str, PodSidecar] = {}
        self.apps: list[Any] = []

    def namespace(self, prefix: str = "e2e-mesh") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=name, labels={"meshtls.dev/inject": "enabled", "e2e": "true"})))
        self.namespaces.append(name)
        return name

    def identity(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """A ServiceAccount and a WorkloadIdentity of the same name."""
        self.core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(name=name)))
        self.kube.create_identity(namespace, name, {"serviceAccountName": name, **spec})

    def pod(self, namespace: str, name: str, security_context: dict[str, Any] | None = None) -> PodSidecar:
        """A pod running as ServiceAccount `name`, injected by the webhook, its sidecar run for real."""
        wait_for(f"{namespace}/{name} Ready", lambda: is_ready(self.kube.identity(namespace, name)), 20)
        wait_for(f"{name}'s sidecar config", lambda: self.kube.configmap_data(namespace, f"{name}-meshtls-proxy"), 10)
        self.core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"serviceAccountName": name, "containers": [{"name": "app", "image": "example/app"}],
                     **({"securityContext": security_context} if security_context else {})}})
        sidecar = PodSidecar(self.api, self.core.read_namespaced_pod(name, namespace), self.workdir / namespace)
        self.sidecars[f"{namespace}/{name}"] = sidecar
        sidecar.start()
        return sidecar

    def echo_app(self, port: int) -> None:
        app = EchoServer(("127.0.0.1", port), EchoHandler)
        threading.Thread(target=app.serve_forever, daemon=True).start()
        self.apps.append(app)

    def close(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.stop()
        for app in self.apps:
            app.shutdown()
        for ns in self.namespaces:
            self.core.delete_namespace(ns, propagation_policy="Background")
