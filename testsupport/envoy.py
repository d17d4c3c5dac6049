"""A real Envoy sidecar as a subprocess, configured from the files meshtls.dataplane.envoy renders.

The config directory is written the kubelet's way (a projected ConfigMap), like the identity and bundle volumes.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from meshtls.dataplane.config import SidecarConfig
from meshtls.dataplane.envoy import envoy_arguments, render_envoy_files
from meshtls.proxy.envoy_bin import envoy_binary
from testsupport.kubelet import write_atomic_volume


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
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
