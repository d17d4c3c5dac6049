"""`make demo`'s sidecars: the injected meshtls-proxy of each example pod, run for real (as the e2e kubelet does), from
the built image when buildah is there, else from the venv, and a call through backend's sidecar that shows the key
exchange it negotiated (X25519MLKEM768 from the image's OpenSSL 3.5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from kubernetes import client
from testsupport.containers import SIDECAR_FROM_ENV, ImageRuntime, Runtime, VenvRuntime, image_runtime
from testsupport.proxymesh import parse_metrics

from e2e.mesh import EchoHandler, EchoServer
from e2e.podrunner import PodSidecar


def demo_runtime(say: Callable[[str], None]) -> Runtime:
    """The image when buildah is installed (and MESHTLS_SIDECAR_FROM is not venv), else the venv; says which."""
    if os.environ.get(SIDECAR_FROM_ENV) != "venv" and shutil.which("buildah"):
        say("building the image or reusing the cached one (make image: buildah, Debian trixie base)")
        runtime = image_runtime()
        say(f"sidecars run from the image {runtime.reference} (chroot into its root, uid 65532, read-only root)")
        return runtime
    why = (f"{SIDECAR_FROM_ENV}=venv" if os.environ.get(SIDECAR_FROM_ENV) == "venv" else
           "buildah is not installed: apt-get install buildah debootstrap to run them from the image")
    say(f"sidecars run from the venv ({why})")
    return VenvRuntime()


class DemoSidecars:
    def __init__(self, api: client.ApiClient, namespace: str, workdir: Path, runtime: Runtime) -> None:
        self.api, self.namespace, self.workdir, self.runtime = api, namespace, workdir, runtime
        self.sidecars: dict[str, PodSidecar] = {}
        self.app: EchoServer | None = None

    def start(self, pods: list[str], app_port: int) -> None:
        """Runs each pod's injected sidecar, and a small HTTP app behind backend's (the example's nginx)."""
        self.app = EchoServer(("127.0.0.1", app_port), EchoHandler)
        threading.Thread(target=self.app.serve_forever, daemon=True).start()
        core = client.CoreV1Api(self.api)
        for name in pods:
            sidecar = PodSidecar(self.api, core.read_namespaced_pod(name, self.namespace), self.workdir,
                                 runtime=self.runtime)
            sidecar.start()
            self.sidecars[name] = sidecar

    def call(self, client_pod: str, server_pod: str, port: int) -> tuple[str, str]:
        """An mTLS request with client_pod's identity to server_pod's sidecar, by `openssl s_client` (the image's
        when the sidecars run from it); returns (the response line, the group server_pod's sidecar counted)."""
        identity = self.sidecars[client_pod].host_path("/var/run/meshtls/identity")
        bundle = self.sidecars[client_pod].host_path("/var/run/meshtls/bundle")
        args = ["s_client", "-connect", f"127.0.0.1:{port}", "-quiet"]
        request = "GET /demo HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"
        if isinstance(self.runtime, ImageRuntime):
            mounts = {"/var/run/meshtls/identity": identity, "/var/run/meshtls/bundle": bundle}
            argv, env = self.runtime.launch(["openssl", *args, "-cert", "/var/run/meshtls/identity/tls.crt", "-key",
                                             "/var/run/meshtls/identity/tls.key", "-CAfile",
                                             "/var/run/meshtls/bundle/ca.crt"], mounts)
        else:
            argv, env = ["openssl", *args, "-cert", str(identity / "tls.crt"), "-key", str(identity / "tls.key"),
                         "-CAfile", str(bundle / "ca.crt")], dict(os.environ)
        result = subprocess.run(argv, env=env, input=request, capture_output=True, text=True, timeout=30)
        first = (result.stdout.splitlines() or [result.stderr.strip()[-200:]])[0]
        server = self.sidecars[server_pod].process
        metrics = parse_metrics(server.metrics()) if server is not None else {}
        # meshtls-proxy counts meshtls_proxy_tls_groups_total{group}; Envoy envoy_listener_ssl_curves{envoy_ssl_curve}
        # (a counter, so prometheus_client's parser names its samples with _total)
        groups = [dict(labels).get("group") or dict(labels)["envoy_ssl_curve"]
                  for (name, labels), value in metrics.items()
                  if name in ("meshtls_proxy_tls_groups_total", "envoy_listener_ssl_curves_total") and value > 0]
        return first, ", ".join(sorted(groups)) or "none"

    def stop(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.stop()
        if self.app is not None:
            self.app.shutdown()
