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
import threading
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from testsupport.containers import Runtime, User, sidecar_runtime
from testsupport.kubelet import DATA_DIR, SidecarProcess, write_atomic_volume

from e2e.operator_process import free_port

SIDECAR = "meshtls-proxy"


class PodSidecar:
    def __init__(self, api: client.ApiClient, pod: Any, workdir: Path, sync_interval: float = 0.25,
                 runtime: Runtime | None = None) -> None:
        self.core = client.CoreV1Api(api)
        self.pod = pod
        self.namespace = pod.metadata.namespace
        self.dir = workdir / pod.metadata.name
        self.sync_interval = sync_interval
        containers = list(pod.spec.init_containers or []) + list(pod.spec.containers)
        matches = [c for c in containers if c.name == SIDECAR]
        assert matches, f"pod {pod.metadata.name} has no {SIDECAR} container (not injected)"
        self.container = matches[0]
        assert self.container.command and self.container.command[0] == "meshtls-proxy", self.container.command
        volumes = {v.name: v for v in pod.spec.volumes or []}
        self.mounts: dict[str, tuple[str, str, Path]] = {}  # container path -> (kind, object name, host dir)
        self.modes: dict[Path, int] = {}  # host dir -> the volume's defaultMode, as the kubelet applies it
        for mount in self.container.volume_mounts or []:
            volume = volumes[mount.name]
            if volume.secret is not None:
                source, mode = ("secret", volume.secret.secret_name), volume.secret.default_mode
            elif volume.config_map is not None:
                source, mode = ("configmap", volume.config_map.name), volume.config_map.default_mode
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
        self.process: SidecarProcess | None = None
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

    def start(self) -> SidecarProcess:
        self.sync()
        config_arg = self.container.command[self.container.command.index("--config") + 1]
        config_dir = str(Path(config_arg).parent)
        config = yaml.safe_load((self.host_path(config_dir) / Path(config_arg).name).read_text())
        config["admin"] = {"address": "127.0.0.1", "port": free_port()}
        for _, _, host_dir in self.mounts.values():  # a mount waits for its Secret; its directory exists already
            host_dir.mkdir(parents=True, exist_ok=True)
        self.process = SidecarProcess(
            config,
            identity_dir=self.host_path(config["identityDir"]),
            bundle_dir=self.host_path(config["bundleDir"]),
            config_dir=self.dir / "rendered-config",
            log_file=self.dir / "sidecar.log",
            runtime=self.runtime,
            user=self.user,
            mount_paths=(config["identityDir"], config["bundleDir"], config_dir),
        )
        self.process.start()
        self._thread.start()
        return self.process

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None:
            self.process.stop()
