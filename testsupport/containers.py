"""Where the e2e kubelet's containers run from: the built image (the default) or the development venv.

The one seam between a container spec and a process: `Runtime.launch(command, mounts, user)` gives the argv and
environment to start, and `Runtime.sees(host_dir, container_path)` says which path the process sees for a mounted
volume (its container path in the image; the host directory itself in the venv, which has no mounts).

- `ImageRuntime` runs the command from the image's root, unpacked once per image (testsupport.image): in a private
  mount namespace it makes the root read-only, binds each volume onto its mount path (read-only), `/dev` and
  `/proc`, then chroots with the pod's uid, gid and supplementary groups. The process keeps its PID through every
  exec, so signals reach the container's process as they would under a kubelet.
- `VenvRuntime` runs the same command from this interpreter's environment (fast, for development).

MESHTLS_SIDECAR_FROM=image|venv picks one (default: image). CI runs the image.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SIDECAR_FROM_ENV = "MESHTLS_SIDECAR_FROM"
SIDECAR_UID = 65532


@dataclass(frozen=True)
class User:
    uid: int = SIDECAR_UID
    gid: int = SIDECAR_UID
    groups: tuple[int, ...] = ()  # supplementary groups (the pod's fsGroup)


class Runtime(Protocol):
    name: str

    def sees(self, host_dir: Path, container_path: str) -> str: ...

    def launch(self, command: Sequence[str], mounts: Mapping[str, Path], user: User = User(),
               writable: Collection[str] = ()) -> tuple[list[str], dict[str, str]]: ...


class VenvRuntime:
    """The command's program from this interpreter's venv (`meshtls-proxy`, `meshtls`) or the envoy wheel."""

    name = "venv"

    def sees(self, host_dir: Path, container_path: str) -> str:
        return str(host_dir)

    def launch(self, command: Sequence[str], mounts: Mapping[str, Path], user: User = User(),
               writable: Collection[str] = ()) -> tuple[list[str], dict[str, str]]:
        return [*venv_program(command[0]), *command[1:]], dict(os.environ)


def venv_program(name: str) -> list[str]:
    if name == "envoy":
        from meshtls.proxy.envoy_bin import envoy_binary

        return [str(envoy_binary())]
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    if name == "meshtls-proxy":
        return [sys.executable, "-m", "meshtls.proxy"]
    raise FileNotFoundError(f"{name} is not in {script.parent}: run `make venv`")


def resolve_in_root(root: Path, path: str) -> Path:
    """`path` as seen inside `root`: symlinks followed within the root (Debian's /var/run -> /run is absolute, and
    following it from outside would reach the host's /run). Missing components are kept as they are."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


@dataclass
class ImageRuntime:
    """Runs commands from an unpacked image root: chroot, the pod's user, read-only root, volumes bound in."""

    root: Path
    env: dict[str, str]
    reference: str = ""
    name: str = "image"
    tools: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(f"running containers from the image needs root (a mount namespace, chroot): run as "
                               f"root, or set {SIDECAR_FROM_ENV}=venv")
        for tool in ("unshare", "mount", "chroot", "sh"):
            found = shutil.which(tool)
            if found is None:
                raise RuntimeError(f"{tool} is needed to run containers from the image (util-linux, coreutils)")
            self.tools[tool] = found

    def sees(self, host_dir: Path, container_path: str) -> str:
        return container_path

    def mount_point(self, container_path: str) -> Path:
        """The directory in the root to bind onto, created once (the root is shared by every container of it)."""
        target = resolve_in_root(self.root, container_path)
        if not target.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"mount path {container_path} escapes the image root")
        target.mkdir(parents=True, exist_ok=True)
        return target

    def launch(self, command: Sequence[str], mounts: Mapping[str, Path], user: User = User(),
               writable: Collection[str] = ()) -> tuple[list[str], dict[str, str]]:
        """`writable`: container paths bound read-write (an emptyDir); every other volume is read-only."""
        root = shlex.quote(str(self.root))
        mount, chroot = self.tools["mount"], self.tools["chroot"]
        steps = [
            # a read-only view of the shared root, private to this process's mount namespace
            f"{mount} --bind {root} {root}",
            f"{mount} -o remount,bind,ro {root}",
            f"{mount} --bind /dev {shlex.quote(str(self.mount_point('/dev')))}",
            f"{mount} -t proc proc {shlex.quote(str(self.mount_point('/proc')))}",
        ]
        for container_path, host_dir in mounts.items():
            target = shlex.quote(str(self.mount_point(container_path)))
            steps.append(f"{mount} --bind {shlex.quote(str(host_dir))} {target}")
            if container_path not in writable:
                steps.append(f"{mount} -o remount,bind,ro {target}")
        groups = ",".join(str(g) for g in (user.gid, *user.groups))
        steps.append(f"exec {chroot} --userspec={user.uid}:{user.gid} --groups={groups} {root} "
                     + " ".join(shlex.quote(c) for c in command))
        script = " && ".join(steps)
        argv = [self.tools["unshare"], "--mount", "--propagation", "private", "--",
                self.tools["sh"], "-c", script]
        # the host's tools are named by absolute path: the environment is the image's, PATH included
        return argv, dict(self.env)


def image_env(config: Mapping[str, object]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in config.get("Env") or []:  # type: ignore[attr-defined]
        key, _, value = str(item).partition("=")
        env[key] = value
    return env


@functools.cache
def image_runtime() -> ImageRuntime:
    """The image for the current tree (built or reused, testsupport.image) and its unpacked root."""
    from testsupport import image

    try:
        img = image.ensure_image()
        root = image.image_root(img)
        config = image.image_config(img.reference)
    except image.ImageError as exc:
        raise RuntimeError(f"{exc} (or set {SIDECAR_FROM_ENV}=venv to run sidecars from the venv)") from exc
    return ImageRuntime(root=root, env=image_env(config), reference=img.reference)


def sidecar_runtime() -> Runtime:
    """What the e2e kubelet runs injected sidecars from: MESHTLS_SIDECAR_FROM=image (default) or venv."""
    choice = os.environ.get(SIDECAR_FROM_ENV, "image")
    if choice == "venv":
        return VenvRuntime()
    if choice == "image":
        return image_runtime()
    raise ValueError(f"{SIDECAR_FROM_ENV}={choice!r}: allowed values are image, venv")
