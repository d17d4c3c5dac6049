"""A real OCI registry on loopback (Debian's `docker-registry`, CNCF distribution 2.8) and skopeo to read it.

The chart e2e pulls the meshtls image from here: `make image` builds it, the session pushes it once, and tests
check with skopeo (an independent client) that the reference the chart renders resolves to what was pushed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from testsupport.kubelet import stop_process

from e2e.operator_process import free_port


class RegistryError(RuntimeError):
    pass


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RegistryError(f"{name} is needed by the image e2e: apt-get install {package} (bash .ci/run does)")
    return path


class LoopbackRegistry:
    """`docker-registry serve` on 127.0.0.1:<free port>, storage in a temp dir; read_only refuses every push."""

    def __init__(self, read_only: bool = False) -> None:
        self.exe = _tool("docker-registry", "docker-registry")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="meshtls-registry-"))
        self.read_only = read_only
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> LoopbackRegistry:
        storage: dict[str, Any] = {"filesystem": {"rootdirectory": str(self.dir / "data")}}
        if self.read_only:
            storage["maintenance"] = {"readonly": {"enabled": True}}
        config = {"version": 0.1, "log": {"level": "warn"}, "storage": storage,
                  "http": {"addr": self.address}}
        (self.dir / "config.yml").write_text(yaml.safe_dump(config))
        log = open(self.dir / "registry.log", "wb")  # noqa: SIM115 - the registry writes to it while it runs
        self.process = subprocess.Popen([self.exe, "serve", str(self.dir / "config.yml")], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RegistryError(f"docker-registry exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RegistryError(f"docker-registry did not answer on {self.address} within {timeout}s: {self.log()}")

    def log(self) -> str:
        try:
            return (self.dir / "registry.log").read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackRegistry:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def skopeo_inspect(reference: str, config: bool = False, raw: bool = False) -> dict[str, Any]:
    """`skopeo inspect` of docker://reference on a loopback registry (no TLS there): the manifest summary, the
    image config (config=True) or the raw manifest (raw=True)."""
    args = [_tool("skopeo", "skopeo"), "inspect", "--tls-verify=false", *(["--config"] if config else []),
            *(["--raw"] if raw else []), f"docker://{reference}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RegistryError(f"skopeo inspect {reference} failed: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))
