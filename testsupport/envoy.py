"""A real Envoy sidecar as a subprocess, configured from the files meshtls.dataplane.envoy renders.

The config directory is written the kubelet's way (a projected ConfigMap), like the identity and bundle volumes.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from meshtls.dataplane.config import SidecarConfig
from meshtls.dataplane.envoy import (
    ENVOY_CONFIG_FILE,
    ENVOY_FILES,
    ENVOY_LAUNCHER,
    envoy_arguments,
    render_envoy_files,
)
from meshtls.dataplane.layout import CONFIG_DIR
from meshtls.proxy.envoy_bin import envoy_binary
from testsupport.containers import Runtime, User, VenvRuntime
from testsupport.kubelet import stop_process, write_atomic_volume


def envoy_command(config_dir: Path) -> list[str]:
    """The sidecar's own command line (without hot restart, several Envoys run side by side here too)."""
    return [str(envoy_binary()), *envoy_arguments(str(config_dir)), "-l", "warning"]


class EnvoyProcess:
    def __init__(self, config: SidecarConfig, config_dir: Path, name: str = "envoy") -> None:
        self.config = config
        self.config_dir = config_dir
        self.name = name
        self.log_path = config_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        files = render_envoy_files(config, str(config_dir))
        write_atomic_volume(config_dir, {k: v.encode() for k, v in files.items()})

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.config.admin_port}"

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def start(self, timeout: float = 20.0) -> EnvoyProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(envoy_command(self.config_dir), stdout=log,
                                         stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until /ready says LIVE and no listener is still warming (each waits for its SDS secrets)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.get("/ready")
                if status == 200 and body.strip() == "LIVE" and self.stat("listener_manager.total_listeners_warming") \
                        == 0:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.log()}")

    def stats(self) -> dict[str, int]:
        """Counters and gauges (histograms left out), from the admin's plain /stats."""
        _, text = self.get("/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        return stop_process(self.proc, timeout)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class EnvoyContainer:
    """An injected `meshtls-envoy` container run for real, the way the harness's kubelet runs meshtls-proxy: the
    operator's files from the pod's config volume with the container's paths moved to the host directories the
    volumes are written to (and the admin to a free loopback port, since every pod shares this machine's network),
    the container's own command, its exec readiness probe as the readiness check, its preStop hook on demand."""

    def __init__(self, container: Mapping[str, Any], mounts: Mapping[str, Path], workdir: Path,
                 admin_port: int, runtime: Runtime | None = None, user: User = User()) -> None:
        self.container = container
        self.workdir = Path(workdir)
        self.config_dir = self.workdir / "rendered-config"
        self.log_file = self.workdir / "sidecar.log"
        self.admin_port = admin_port
        self.runtime = runtime or VenvRuntime()
        self.user = user
        # container path -> host path; the config volume's files are rewritten into config_dir
        self.paths = {path: (self.config_dir if path == CONFIG_DIR else Path(host)) for path, host in mounts.items()}
        # container path -> the path the process sees: the host's (venv), or the container's with the dir bound there
        self.seen = {path: self.runtime.sees(host, path) for path, host in self.paths.items()}
        self.source_config = Path(mounts[CONFIG_DIR])
        self.process: subprocess.Popen[bytes] | None = None

    def _host(self, arg: str) -> str:
        for path, seen in sorted(self.seen.items(), key=lambda item: -len(item[0])):
            if arg == path or arg.startswith(path + "/"):
                return seen + arg[len(path):]
        return arg

    def _command(self, command: list[str]) -> tuple[list[str], dict[str, str]]:
        """The container's command on this machine, through the runtime (the launcher from this venv, or from the
        image), paths moved, the admin port moved (`--admin-port` of the probe and the hook)."""
        assert command[0] == ENVOY_LAUNCHER, command
        out = [ENVOY_LAUNCHER]
        for i, arg in enumerate(command[1:], 1):
            out.append(str(self.admin_port) if command[i - 1] == "--admin-port" else self._host(arg))
        return self.runtime.launch(out, self.paths, self.user)

    def write_config(self) -> None:
        files: dict[str, bytes] = {}
        for name in ENVOY_FILES:
            text = (self.source_config / name).read_text()
            for path, seen in sorted(self.seen.items(), key=lambda item: -len(item[0])):
                text = text.replace(f"{path}/", f"{seen}/").replace(f"path: {path}\n", f"path: {seen}\n")
            files[name] = text.encode()
        bootstrap = yaml.safe_load(files[ENVOY_CONFIG_FILE])
        bootstrap["admin"]["address"]["socket_address"]["port_value"] = self.admin_port
        files[ENVOY_CONFIG_FILE] = yaml.safe_dump(bootstrap, sort_keys=False).encode()
        write_atomic_volume(self.config_dir, files)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 30.0) -> EnvoyContainer:
        self.write_config()
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv, env = self._command(list(self.container["command"]))
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.wait_ready(timeout)
        return self

    def ready(self) -> subprocess.CompletedProcess[str]:
        """The container's readiness probe, run as the kubelet runs an exec probe."""
        argv, env = self._command(list(self.container["readinessProbe"]["exec"]["command"]))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"Envoy exited with {self.process.returncode}:\n{self.log()}")
            result = self.ready()
            if result.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"Envoy not ready within {timeout} s ({result and result.stderr}):\n{self.log()}")

    def pre_stop(self) -> subprocess.CompletedProcess[str]:
        argv, env = self._command(list(self.container["lifecycle"]["preStop"]["exec"]["command"]))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> str:
        """Prometheus text, as a scraper reads it through the admin."""
        return self.get("/stats/prometheus")[1].decode()

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.get("/stats")[1].decode().splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in (content := self.log()):
                return content
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in Envoy's log within {timeout}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        return stop_process(self.process, timeout)
