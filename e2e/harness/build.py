"""Builds the pinned control-plane binaries from the Go module proxy into a cache outside the repository.

Every component is built the same way: a small "tools" module (``<cache>/src/<tag>/go.mod``) requires the
upstream module at the pinned version, adds the replace lines the upstream go.mod has but a dependency's
go.mod cannot pass on, and ``go build -o <tmp> pkg...`` builds all of that module's binaries in one call.
The output directory is renamed to ``<cache>/bin/<tag>/`` only when the build succeeded, so an interrupted
build is never mistaken for a complete one.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .paths import cache_dir

KUBERNETES_VERSION = "v1.34.1"
ETCD_VERSION = "v3.5.35"
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.16.4"

# go.sum of each tools module: modules fetched with GOSUMDB=off are still checked against known hashes.
_GOSUM_DIR = Path(__file__).parent / "gosum"

# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...; a tools
# module has to replace each with the published v0.X.Y tag itself.
_K8S_STAGING = (
    "api",
    "apiextensions-apiserver",
    "apimachinery",
    "apiserver",
    "cli-runtime",
    "client-go",
    "cloud-provider",
    "cluster-bootstrap",
    "code-generator",
    "component-base",
    "component-helpers",
    "controller-manager",
    "cri-api",
    "cri-client",
    "csi-translation-lib",
    "dynamic-resource-allocation",
    "endpointslice",
    "externaljwt",
    "kms",
    "kube-aggregator",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "metrics",
    "mount-utils",
    "pod-security-admission",
    "sample-apiserver",
    "sample-cli-plugin",
    "sample-controller",
)


def _k8s_version_ldflags(version: str) -> tuple[str, ...]:
    major, minor = version.lstrip("v").split(".")[:2]
    flags: list[str] = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return tuple(flags)


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    version: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    replaces: tuple[tuple[str, str], ...] = ()
    ldflags: tuple[str, ...] = field(default=())

    @property
    def tag(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def bin_dir(self) -> Path:
        return cache_dir() / "bin" / self.tag

    @property
    def src_dir(self) -> Path:
        return cache_dir() / "src" / self.tag

    @property
    def go_sum(self) -> Path:
        return _GOSUM_DIR / f"{self.tag}.sum"

    @property
    def log_file(self) -> Path:
        return cache_dir() / "logs" / f"build-{self.tag}.log"

    def is_built(self) -> bool:
        return all((self.bin_dir / b).is_file() for b in self.binaries)

    def go_mod(self) -> str:
        lines = [f"module meshtls.dev/harness/{self.name}", "", "go 1.24.0", ""]
        lines.append(f"require {self.module} {self.version}")
        lines += [f"replace {old} => {new}" for old, new in self.replaces]
        return "\n".join(lines) + "\n"


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="etcd",
        module="go.etcd.io/etcd/server/v3",
        version=ETCD_VERSION,
        packages=("go.etcd.io/etcd/server/v3",),
        binaries=("etcd",),
    ),
    Component(
        name="kubernetes",
        module="k8s.io/kubernetes",
        version=KUBERNETES_VERSION,
        packages=tuple(
            f"k8s.io/kubernetes/cmd/{b}"
            for b in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
        ),
        binaries=("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
        replaces=tuple(
            (f"k8s.io/{m}", f"k8s.io/{m} v0.{KUBERNETES_VERSION.split('.', 1)[1]}") for m in _K8S_STAGING
        ),
        ldflags=_k8s_version_ldflags(KUBERNETES_VERSION),
    ),
    Component(
        name="kwok",
        module="sigs.k8s.io/kwok",
        version=KWOK_VERSION,
        packages=("sigs.k8s.io/kwok/cmd/kwok",),
        binaries=("kwok",),
        ldflags=(f"-X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",),
    ),
    Component(
        name="helm",
        module="helm.sh/helm/v3",
        version=HELM_VERSION,
        packages=("helm.sh/helm/v3/cmd/helm",),
        binaries=("helm",),
        ldflags=(f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",),
    ),
)

# binary name -> component that provides it
BINARIES: dict[str, Component] = {b: c for c in COMPONENTS for b in c.binaries}


class BuildError(RuntimeError):
    pass


def binary(name: str) -> Path:
    """Path of a cached binary (which may not be built yet)."""
    try:
        return BINARIES[name].bin_dir / name
    except KeyError:
        raise BuildError(f"unknown binary {name!r}; known: {', '.join(sorted(BINARIES))}") from None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created with its parents), held for the block: one process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    goflags = env.get("GOFLAGS", "").split()
    goflags = [f for f in goflags if not f.startswith("-mod=")] + ["-mod=mod"]
    env.update(CGO_ENABLED="0", GOSUMDB="off", GOFLAGS=" ".join(goflags), GOWORK="off", GO111MODULE="on")
    return env


def build_component(
    c: Component, log: Callable[[str], None] = _stderr, progress_every: float = 15.0
) -> float:
    """Builds one component unless it is already cached; returns the seconds spent (0 when cached)."""
    with file_lock(cache_dir() / "bin" / ".build.lock"):
        if c.is_built():
            return 0.0
        go = shutil.which("go")
        what = f"{c.name} {c.version} ({', '.join(c.binaries)})"
        if go is None:
            raise BuildError(
                f"building {what} needs the Go toolchain, and `go` is not on PATH (install Go >= 1.24)"
            )
        c.src_dir.mkdir(parents=True, exist_ok=True)
        c.log_file.parent.mkdir(parents=True, exist_ok=True)
        (c.src_dir / "go.mod").write_text(c.go_mod())
        if c.go_sum.is_file():  # checksums kept in the repository: sum.golang.org may be out of reach
            shutil.copyfile(c.go_sum, c.src_dir / "go.sum")
        tmp = c.bin_dir.with_name(f".{c.tag}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # With one package, -o names the file (a path ending in /v3 would otherwise name the binary "server").
        out = str(tmp / c.binaries[0]) if len(c.packages) == 1 else str(tmp) + os.sep
        cmd = [
            go,
            "build",
            "-trimpath",
            "-ldflags",
            " ".join(("-s", "-w", *c.ldflags)),
            "-o",
            out,
            *c.packages,
        ]
        log(f"building {what} -> {c.bin_dir} (log: {c.log_file})")
        start = time.monotonic()
        try:
            with c.log_file.open("w") as fh:
                fh.write(f"$ cd {c.src_dir} && {shlex.join(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(
                    cmd,
                    cwd=c.src_dir,
                    env=_go_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
                next_report = start + progress_every
                try:
                    while proc.poll() is None:
                        time.sleep(0.5)
                        if time.monotonic() >= next_report:
                            log(f"  building {c.name} {c.version}: {time.monotonic() - start:.0f} s")
                            next_report += progress_every
                except BaseException:
                    proc.terminate()
                    proc.wait()
                    raise
            if proc.returncode != 0:
                tail = "\n".join("  " + line for line in c.log_file.read_text().splitlines()[-5:])
                raise BuildError(
                    f"building {what} failed (go build exit {proc.returncode}); see {c.log_file}\n{tail}"
                )
            missing = [b for b in c.binaries if not (tmp / b).is_file()]
            if missing:
                raise BuildError(f"building {what} produced no {', '.join(missing)}; see {c.log_file}")
            c.bin_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(c.bin_dir, ignore_errors=True)  # an incomplete leftover from an older layout
            tmp.rename(c.bin_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        took = time.monotonic() - start
        log(f"built {c.name} {c.version} in {took:.0f} s")
        return took


def build_all(log: Callable[[str], None] = _stderr) -> dict[str, float]:
    """Builds every missing component, one after the other; returns seconds per component built."""
    return {c.name: build_component(c, log) for c in COMPONENTS}
