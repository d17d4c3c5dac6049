"""Playing the kubelet's part for sidecar volumes and the sidecar process itself, without a cluster.

`write_atomic_volume` writes a Secret or ConfigMap into a directory exactly the way the kubelet's AtomicWriter
(pkg/volume/util/atomic_writer.go) does, so the proxy's hot reload meets the real thing:

    dir/..2026_11_27_07_00_00.123456789/tls.crt     the payload, in a new hidden timestamped directory
    dir/..data -> ..2026_11_27_07_00_00.123456789    swapped atomically: symlink ..data_tmp, rename over ..data
    dir/tls.crt -> ..data/tls.crt                     user-visible symlinks, created once
                                                      then the previous timestamped directory is removed

`SidecarProcess` runs `meshtls-proxy --config ...` as a real subprocess with its config written the same way,
from the venv or from the built image (testsupport.containers: the one place a container becomes a process).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from meshtls.dataplane.layout import BUNDLE_DIR, CONFIG_DIR, CONFIG_FILE, IDENTITY_DIR
from meshtls.dataplane.layout import DATA_LINK as DATA_DIR
from meshtls.proxy.main import BIND_ENV
from testsupport.containers import Runtime, User, VenvRuntime, venv_program

DATA_DIR_TMP = "..data_tmp"


def _timestamped_dir_name(now: dt.datetime | None = None) -> str:
    # Go: os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05.")) -> that prefix plus random digits.
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("..%Y_%m_%d_%H_%M_%S.")
    return stamp + str(secrets.randbelow(10**9)).zfill(9)


def read_volume(directory: Path) -> dict[str, bytes]:
    """The current payload, read through `..data` (what a container sees); {} when nothing was written yet."""
    data = directory / DATA_DIR
    if not data.is_dir():
        return {}
    out: dict[str, bytes] = {}
    for path in sorted(data.rglob("*")):
        if path.is_file():
            out[path.relative_to(data).as_posix()] = path.read_bytes()
    return out


def _validate_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0].startswith(".."):
        raise ValueError(f"invalid volume file name {name!r}")


def write_atomic_volume(directory: Path, files: Mapping[str, bytes], mode: int = 0o644) -> bool:
    """Publish `files` into `directory` atomically; False (nothing touched) when the content is unchanged."""
    directory = Path(directory)
    for name in files:
        _validate_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    current = read_volume(directory)
    if current == dict(files) and (directory / DATA_DIR).is_symlink():
        return False
    old_ts = os.readlink(directory / DATA_DIR) if (directory / DATA_DIR).is_symlink() else None

    # 1. the payload, into a fresh timestamped directory
    while True:
        ts_name = _timestamped_dir_name()
        try:
            (directory / ts_name).mkdir(mode=0o755)
            break
        except FileExistsError:  # pragma: no cover - 1e-9 chance
            continue
    ts_dir = directory / ts_name
    for name, content in files.items():
        target = ts_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.chmod(target, mode)

    # 2. ..data_tmp -> the new directory, renamed over ..data: the one atomic step
    tmp_link = directory / DATA_DIR_TMP
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(ts_name, tmp_link)
    os.rename(tmp_link, directory / DATA_DIR)

    # 3. user-visible symlinks for top-level names, created once
    wanted = {name.split("/", 1)[0] for name in files}
    for top in sorted(wanted):
        link = directory / top
        if not link.is_symlink():
            if link.exists():
                raise FileExistsError(f"{link} exists and is not the kubelet's symlink")
            os.symlink(os.path.join(DATA_DIR, top), link)

    # 4. visible names that left the payload
    for entry in directory.iterdir():
        if entry.name.startswith("..") or entry.name in wanted:
            continue
        if entry.is_symlink() and os.readlink(entry).startswith(DATA_DIR + os.sep):
            entry.unlink()

    # 5. the previous payload
    if old_ts and old_ts != ts_name:
        shutil.rmtree(directory / old_ts, ignore_errors=True)
    return True


def identity_files(cert_chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> dict[str, bytes]:
    """A kubernetes.io/tls Secret's keys."""
    return {"tls.crt": cert_chain_pem, "tls.key": key_pem, "ca.crt": ca_pem}


def bundle_files(ca_pem: bytes, crl_pem: bytes | None = None) -> dict[str, bytes]:
    """The trust bundle ConfigMap's keys."""
    return {"ca.crt": ca_pem} | ({"crl.pem": crl_pem} if crl_pem is not None else {})


def proxy_command() -> list[str]:
    """`meshtls-proxy` from the running interpreter's environment (falls back to `python -m`)."""
    return venv_program("meshtls-proxy")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stop a container's process as the kubelet does: `sig` (SIGTERM), wait up to `timeout` seconds, SIGKILL if it
    does not go. Returns the exit code (None: never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class SidecarProcess:
    """One `meshtls-proxy` as a real process, with its config in a kubelet-style ConfigMap volume.

    config: the proxy.yaml mapping (SidecarConfig.to_dict() shape); identityDir/bundleDir are set to the paths the
    process sees: the host directories (venv), or their mount paths with the directories bound there (image).
    """

    def __init__(self, config: Mapping[str, Any], identity_dir: Path, bundle_dir: Path, config_dir: Path,
                 log_file: Path | None = None, bind_address: str = "127.0.0.1",
                 extra_args: tuple[str, ...] = (), env: Mapping[str, str] | None = None,
                 runtime: Runtime | None = None, user: User = User(),
                 mount_paths: tuple[str, str, str] = (IDENTITY_DIR, BUNDLE_DIR, CONFIG_DIR),
                 extra_mounts: Mapping[str, Path] | None = None) -> None:
        self.runtime = runtime or VenvRuntime()
        self.user = user
        # container path -> host directory
        self.mounts = dict(zip(mount_paths, (Path(identity_dir), Path(bundle_dir), Path(config_dir)), strict=True))
        self.extra_mounts = dict(extra_mounts or {})  # writable ones, e.g. the Workload API socket's emptyDir
        self.config = dict(config) | {"identityDir": self.runtime.sees(Path(identity_dir), mount_paths[0]),
                                      "bundleDir": self.runtime.sees(Path(bundle_dir), mount_paths[1])}
        self._config_seen = self.runtime.sees(Path(config_dir), mount_paths[2])
        self.identity_dir = Path(identity_dir)
        self.bundle_dir = Path(bundle_dir)
        self.config_dir = Path(config_dir)
        self.log_file = Path(log_file) if log_file else self.config_dir.parent / f"{self.config_dir.name}.log"
        self.bind_address = bind_address
        self.extra_args = extra_args
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        """On the host."""
        return self.config_dir / CONFIG_FILE

    @property
    def command(self) -> list[str]:
        """The container's command, with the config path the process sees."""
        return ["meshtls-proxy", "--config", f"{self._config_seen}/{CONFIG_FILE}", *self.extra_args]

    @property
    def admin_url(self) -> str:
        admin = self.config.get("admin") or {}
        return f"http://{admin.get('address', '127.0.0.1')}:{admin.get('port', 15090)}"

    def write_config(self) -> None:
        write_atomic_volume(self.config_dir, {CONFIG_FILE: yaml.safe_dump(self.config, sort_keys=False).encode()})

    def start(self, wait: bool = True, timeout: float = 15.0) -> SidecarProcess:
        self.write_config()
        argv, env = self.runtime.launch(self.command, self.mounts | self.extra_mounts, self.user,
                                        writable=tuple(self.extra_mounts))
        env = env | {BIND_ENV: self.bind_address, "PYTHONUNBUFFERED": "1"} | self.env
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"meshtls-proxy exited with {self.process.returncode}:\n{self.log()}")
            try:
                if http_get(self.admin_url + "/healthz", 1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"meshtls-proxy not healthy within {timeout}s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.admin_url + path)

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log()
            if text in content:
                return content
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in the proxy log within {timeout}s:\n{self.log()}")

    def rss_bytes(self) -> int:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")  # pragma: no cover

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        return stop_process(self.process, timeout)

    def __enter__(self) -> SidecarProcess:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
