"""The kubelet's part for an injected pod: mount its Secret and ConfigMaps, run its meshtls-proxy for real.

For a pod admitted by the real API server, this reads the `meshtls-proxy` container the webhook injected, resolves
its volume mounts to the Secret and ConfigMaps they name, writes them into directories the way the kubelet does
(atomic `..data` swap, re-synced from the API every `sync_interval` seconds as the kubelet re-syncs), and runs the
container's command as a real process: from the built image by default (chroot into its root with the container's
uid and the volumes bound onto their mount paths, testsupport.containers), or from the venv with
MESHTLS_SIDECAR_FROM=venv (paths inside the container then map to those directories). Each pod's admin port maps to
a free loopback port, since all "pods" share this machine's network.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from testsupport.containers import Runtime, User, sidecar_runtime
from testsupport.envoy import EnvoyContainer
from testsupport.kubelet import DATA_DIR, SidecarProcess, write_atomic_volume

from e2e.operator_process import free_port

SIDECAR = "meshtls-proxy"
ENVOY_SIDECAR = "meshtls-envoy"  # the Envoy data plane's container (run by testsupport.envoy.EnvoyContainer)


class PodSidecar:
    def __init__(self, api: client.ApiClient, pod: Any, workdir: Path, sync_interval: float = 0.25,
                 runtime: Runtime | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.pod = pod
        self.namespace = pod.metadata.namespace
        self.dir = workdir / pod.metadata.name
        self.sync_interval = sync_interval
        containers = list(pod.spec.init_containers or []) + list(pod.spec.containers)
        matches = [c for c in containers if c.name in (SIDECAR, ENVOY_SIDECAR)]
        assert matches, f"pod {pod.metadata.name} has no {SIDECAR} or {ENVOY_SIDECAR} container (not injected)"
        self.container = matches[0]
        assert self.container.command and self.container.command[0] == self.container.name, self.container.command
        volumes = {v.name: v for v in pod.spec.volumes or []}
        self.mounts: dict[str, tuple[str, str, Path]] = {}  # container path -> (kind, object name, host dir)
        # an emptyDir (the Workload API's socket) lives under a short path: a Unix socket's path is at most 107 bytes
        self._scratch = Path(tempfile.mkdtemp(prefix="meshtls-pod-"))
        self.modes: dict[Path, int] = {}  # host dir -> the volume's defaultMode, as the kubelet applies it
        for mount in self.container.volume_mounts or []:
            volume = volumes[mount.name]
            if volume.secret is not None:
                source, mode = ("secret", volume.secret.secret_name), volume.secret.default_mode
            elif volume.config_map is not None:
                source, mode = ("configmap", volume.config_map.name), volume.config_map.default_mode
            elif volume.empty_dir is not None:
                host = self._scratch / mount.name
                host.mkdir()
                host.chmod(0o777)  # as the kubelet makes an emptyDir: writable by the container's uid
                self.mounts[mount.mount_path] = ("emptydir", mount.name, host)
                continue
            else:
                continue
            self.mounts[mount.mount_path] = (*source, self.dir / mount.name)
            self.modes[self.dir / mount.name] = mode if mode is not None else 0o644
        security = self.container.security_context
        pod_security = pod.spec.security_context
        fs_group = pod_security.fs_group if pod_security is not None else None
        self.user = User(uid=(security and security.run_as_user) or 0, gid=(security and security.run_as_group) or 0,
                         groups=(fs_group,) if fs_group is not None else ())
        self.runtime = runtime or sidecar_runtime()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, daemon=True, name=f"kubelet-{pod.metadata.name}")
        self.process: SidecarProcess | EnvoyContainer | None = None
        self.syncs = 0

    def _read(self, kind: str, name: str) -> dict[str, bytes] | None:
        try:
            if kind == "secret":
                s = self.core.read_namespaced_secret(name, self.namespace)
                return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}
            cm = self.core.read_namespaced_config_map(name, self.namespace)
            return {k: v.encode() for k, v in (cm.data or {}).items()}
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def sync(self) -> None:
        for kind, name, host_dir in self.mounts.values():
            if kind == "emptydir":
                continue
            data = self._read(kind, name)
            if data is not None and write_atomic_volume(host_dir, data, self.modes[host_dir]):
                if self.user.groups:  # the kubelet's fsGroup ownership: group-readable keys for the sidecar
                    for path in (host_dir / DATA_DIR).resolve().rglob("*"):
                        os.chown(path, 0, self.user.groups[0])
                self.syncs += 1

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self.sync()
            except Exception:  # a transient API error: the kubelet retries on its next sync too
                pass

    def host_path(self, container_path: str) -> Path:
        return self.mounts[container_path][2]

    def translate(self, value: str) -> str:
        """A container path (or a unix:// URI of one) under a mount, as the path on this machine."""
        scheme = "unix://" if value.startswith("unix://") else ""
        path = value[len(scheme):]
        for mount_path, (_, _, host_dir) in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if path == mount_path or path.startswith(mount_path + "/"):
                return scheme + str(host_dir) + path[len(mount_path):]
        return value

    def seen(self, value: str) -> str:
        """A container path (or a unix:// URI of one) as the sidecar's process sees it: the host's path (venv), or the
        container's own with the directory bound there (image)."""
        scheme = "unix://" if value.startswith("unix://") else ""
        path = value[len(scheme):]
        for mount_path, (_, _, host_dir) in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if path == mount_path or path.startswith(mount_path + "/"):
                return scheme + self.runtime.sees(host_dir, mount_path) + path[len(mount_path):]
        return value

    def app_env(self, container: str = "app") -> dict[str, str]:
        """The env the webhook gave an app container, its paths translated (SPIFFE_ENDPOINT_SOCKET, ...)."""
        (app,) = [c for c in self.pod.spec.containers if c.name == container]
        return {e.name: self.translate(e.value or "") for e in app.env or []}

    def start(self) -> SidecarProcess | EnvoyContainer:
        self.sync()
        if self.container.name == ENVOY_SIDECAR:
            container = client.ApiClient().sanitize_for_serialization(self.container)
            self.process = EnvoyContainer(container, {path: host for path, (_, _, host) in self.mounts.items()},
                                          self.dir, free_port(), self.runtime, self.user).start()
            self._thread.start()
            return self.process
        config_arg = self.container.command[self.container.command.index("--config") + 1]
        config_dir = str(Path(config_arg).parent)
        config = yaml.safe_load((self.host_path(config_dir) / Path(config_arg).name).read_text())
        config["admin"] = {"address": "127.0.0.1", "port": free_port()}
        command = list(self.container.command)
        rest = command[command.index("--config") + 2:]  # e.g. --workload-api-socket <path in the container>
        for _, _, host_dir in self.mounts.values():  # a mount waits for its Secret; its directory exists already
            host_dir.mkdir(parents=True, exist_ok=True)
        self.process = SidecarProcess(
            config,
            identity_dir=self.host_path(config["identityDir"]),
            bundle_dir=self.host_path(config["bundleDir"]),
            config_dir=self.dir / "rendered-config",
            log_file=self.dir / "sidecar.log",
            extra_args=tuple(self.seen(arg) for arg in rest),
            runtime=self.runtime,
            user=self.user,
            mount_paths=(config["identityDir"], config["bundleDir"], config_dir),
            extra_mounts={path: host for path, (kind, _, host) in self.mounts.items() if kind == "emptydir"},
        )
        self.process.start()
        self._thread.start()
        return self.process

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self._scratch, ignore_errors=True)
