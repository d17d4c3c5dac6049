"""The meshtls image, built without Docker: buildah (chroot isolation, vfs storage) on a Debian base from debootstrap.

    python -m testsupport.image build            (`make image`)      builds it, or reuses the cached one
    python -m testsupport.image push REGISTRY    (`make image-push`) pushes it as REGISTRY/meshtls:<version>
    python -m testsupport.image root             prints the unpacked root the e2e kubelet runs sidecars from

Docker Hub is out of reach here, so the Dockerfile's base (`ARG PYTHON_IMAGE`) is pointed at a Debian trixie root
made by debootstrap and committed with `buildah from scratch`; a user with Docker keeps the Dockerfile's default.
Everything lives in ~/.cache/meshtls/image (MESHTLS_IMAGE_CACHE), outside the repo, and the image is tagged by a
hash of its inputs (Dockerfile, pyproject.toml, README.md, operator/, the base), so an unchanged tree is never
rebuilt (the newest three are kept). A failure says what failed and how to fix it in one line, and leaves no
half-built image tagged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MESHTLS_IMAGE_CACHE") or Path.home() / ".cache" / "meshtls" / "image")
MIRROR = os.environ.get("MESHTLS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_SUITE = "trixie"
# python3-venv for the build stage's virtualenv; openssl for the command line (the post-quantum s_client proof)
BASE_PACKAGES = ("python3", "python3-venv", "openssl")
BASE_NAME = "localhost/meshtls-base"
IMAGE_NAME = "localhost/meshtls"
# what the Dockerfile build reads (its .dockerignore lets only these in), hashed into the image's tag
INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "operator")
SKIPPED_PARTS = ("__pycache__", ".egg-info")
SOURCE_TAG_PREFIX = "src-"
IMAGE_USER = "65532:65532"
ENTRYPOINTS = ("meshtls", "meshtls-proxy", "envoy")


class ImageError(RuntimeError):
    """One line: what failed and how to fix it."""


def project_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def storage_args() -> list[str]:
    return ["--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"), "--storage-driver", "vfs"]


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} is not installed: apt-get install {package} (bash .ci/run installs it)")
    return path


def buildah(*args: str, check: bool = True, capture: bool = True, timeout: float = 1800) -> str:
    exe = _require("buildah", "buildah")
    result = subprocess.run([exe, *storage_args(), *args], text=True, timeout=timeout,
                            stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if capture else []
        raise ImageError(f"buildah {' '.join(args[:2])} failed ({result.returncode}): {' '.join(detail)}")
    return (result.stdout or "").strip()


def image_id(reference: str) -> str | None:
    """The local image's ID, or None when no image has that name."""
    result = subprocess.run([_require("buildah", "buildah"), *storage_args(), "inspect", "--type", "image",
                             "--format", "{{.FromImageID}}", reference], capture_output=True, text=True)
    return result.stdout.strip() or None if result.returncode == 0 else None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time per cache (parallel e2e runs share it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


# --- the Debian base --------------------------------------------------------------------------------------------

def base_reference() -> str:
    key = hashlib.sha256(json.dumps([BASE_SUITE, BASE_PACKAGES]).encode()).hexdigest()[:12]
    return f"{BASE_NAME}:{BASE_SUITE}-{key}"


def ensure_base() -> str:
    """A Debian trixie root (debootstrap --variant=minbase) committed as an image; built once, then reused."""
    reference = base_reference()
    if image_id(reference):
        return reference
    debootstrap = _require("debootstrap", "debootstrap")
    started = time.monotonic()
    _log(f"building the base {reference} with debootstrap {BASE_SUITE} from {MIRROR} (about 2 minutes)")
    (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE / "tmp"))
    container = None
    try:
        log = CACHE / "debootstrap.log"
        with open(log, "w") as out:
            result = subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                                     BASE_SUITE, str(rootfs), MIRROR], stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise ImageError(f"debootstrap {BASE_SUITE} from {MIRROR} failed ({' '.join(tail)}; full log {log}): "
                             "check network access to the mirror or set MESHTLS_DEBIAN_MIRROR")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # downloaded .debs and indexes: not needed
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        container = buildah("from", "scratch")
        mountpoint = buildah("mount", container)
        subprocess.run(["cp", "-a", f"{rootfs}/.", mountpoint], check=True)
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd", "/bin/sh", container)
        buildah("commit", "--rm", "--quiet", container, reference)
        container = None
        _log(f"base {reference} built in {time.monotonic() - started:.0f} s")
        return reference
    finally:
        if container is not None:
            buildah("rm", container, check=False)
        shutil.rmtree(rootfs, ignore_errors=True)


# --- the image --------------------------------------------------------------------------------------------------

def _input_files() -> list[Path]:
    """The files .dockerignore lets into the build: not bytecode, egg-info, or hidden tool caches (import-linter
    keeps one in operator/, rewritten by every `make lint`)."""
    files: list[Path] = []
    for name in INPUTS:
        path = REPO / name
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and not any(
                s in part or part.startswith(".") for part in p.relative_to(path).parts for s in SKIPPED_PARTS)]
        elif path.is_file():
            files.append(path)
    return sorted(files)


def source_hash(base_id: str) -> str:
    """A hash of everything the build reads: the files the Dockerfile copies, the Dockerfile, and the base."""
    digest = hashlib.sha256(base_id.encode())
    for path in _input_files():
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    reference: str  # localhost/meshtls:src-<hash>
    id: str
    built: bool  # False when the cached image was reused
    seconds: float

    @property
    def version_reference(self) -> str:
        return f"{IMAGE_NAME}:{project_version()}"


def ensure_image() -> Image:
    """The image for the current tree: the cached one when its inputs are unchanged, else a fresh build."""
    started = time.monotonic()
    with _locked():
        base = ensure_base()
        base_id = image_id(base)
        assert base_id is not None
        reference = f"{IMAGE_NAME}:{SOURCE_TAG_PREFIX}{source_hash(base_id)}"
        found = image_id(reference)
        if found:
            buildah("tag", reference, f"{IMAGE_NAME}:{project_version()}")
            _mark_used(reference)
            return Image(reference, found, False, time.monotonic() - started)
        _log(f"building {reference} from the Dockerfile on {base}")
        log = CACHE / "build.log"
        # a TLS-intercepting proxy's CA (this machine's pip uses one): a build secret, never stored in the image
        ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        secret = ["--secret", f"id=pip-ca,src={ca}"] if ca and Path(ca).is_file() else []
        with open(log, "w") as out:
            result = subprocess.run(
                [_require("buildah", "buildah"), *storage_args(), "bud", "--isolation", "chroot",
                 "--pull=false", *secret, "--build-arg", f"PYTHON_IMAGE={base}", "-f", str(REPO / "Dockerfile"),
                 "-t", reference, str(REPO)], stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            if image_id(reference):  # a failure after the commit: never leave it tagged
                buildah("rmi", reference, check=False)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise ImageError(f"buildah bud of the Dockerfile failed ({' '.join(tail)}; full log {log}): "
                             "fix the Dockerfile step it names (PyPI must be reachable for the build stage)")
        built = image_id(reference)
        assert built is not None
        buildah("tag", reference, f"{IMAGE_NAME}:{project_version()}")
        _mark_used(reference)
        _prune(keep=reference)
        seconds = time.monotonic() - started
        _log(f"built {reference} in {seconds:.0f} s")
        return Image(reference, built, True, seconds)


KEEP_IMAGES = 3  # other worktrees on this machine may be running sidecars from a recent one
KEEP_USED_SECONDS = 6 * 3600  # ... or from an older one they still use: a run elsewhere must not lose its root


def _used_marker(reference: str) -> Path:
    return CACHE / "used" / reference.rsplit(":", 1)[-1]


def _mark_used(reference: str) -> None:
    marker = _used_marker(reference)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def _last_used(entry: dict[str, object]) -> float:
    """When a run last asked for this image (its marker), else when it was built."""
    times = [float(entry.get("created") or 0)]  # type: ignore[arg-type]
    for name in entry.get("names") or []:  # type: ignore[attr-defined]
        marker = _used_marker(str(name))
        if str(name).startswith(f"{IMAGE_NAME}:{SOURCE_TAG_PREFIX}") and marker.exists():
            times.append(marker.stat().st_mtime)
    return max(times)


def prunable(entries: list[dict[str, object]], keep: str, now: float) -> list[dict[str, object]]:
    """Which source-hash images may go: not `keep`, not among the most recently used few, not used lately."""
    ours = sorted((e for e in entries if any(str(n).startswith(f"{IMAGE_NAME}:{SOURCE_TAG_PREFIX}")
                                             for n in e.get("names") or [])),  # type: ignore[attr-defined]
                  key=_last_used, reverse=True)
    others = [e for e in ours if keep not in (e.get("names") or [])]  # type: ignore[operator]
    return [e for e in others[KEEP_IMAGES - 1:] if now - _last_used(e) > KEEP_USED_SECONDS]


def _prune(keep: str) -> None:
    """Older source-hash images (and their unpacked roots) beyond the newest few: vfs stores every layer in full,
    about 1 GB an image with its root."""
    for entry in prunable(json.loads(buildah("images", "--json") or "[]"), keep, time.time()):
        _remove_root(str(entry["id"]))
        buildah("rmi", "--force", str(entry["id"]), check=False)


def image_size(reference: str) -> str:
    """The image's size as `buildah images` reports it (its layers, uncompressed), e.g. "463 MB"."""
    listing = json.loads(buildah("images", "--json", reference) or "[]")
    return str(listing[0]["size"]) if listing else "?"


def image_config(reference: str) -> dict[str, object]:
    return dict(json.loads(buildah("inspect", "--type", "image", reference))["OCIv1"]["config"])


# --- the unpacked root the e2e kubelet runs containers from --------------------------------------------------------

def _root_container(image: str) -> str:
    return f"meshtls-root-{image[:12]}"


def _remove_root(image: str) -> None:
    buildah("rm", _root_container(image), check=False)


def image_root(img: Image) -> Path:
    """The image's root filesystem, unpacked once per image (a buildah working container that is never run)."""
    name = _root_container(img.id)
    with _locked():
        existing = subprocess.run([_require("buildah", "buildah"), *storage_args(), "inspect", "--type",
                                   "container", "--format", "{{.FromImageID}}", name], capture_output=True, text=True)
        if existing.returncode != 0 or existing.stdout.strip() != img.id:
            buildah("rm", name, check=False)
            buildah("from", "--pull=false", "--name", name, img.id)
        return Path(buildah("mount", name))


# --- pushing ----------------------------------------------------------------------------------------------------

def push(img: Image, registry: str, tls_verify: bool | None = None) -> str:
    """Pushes the image as REGISTRY/meshtls:<version>; returns the pushed manifest's digest (sha256:...)."""
    destination = f"{registry.rstrip('/')}/meshtls:{project_version()}"
    loopback = registry.split(":")[0] in ("localhost", "127.0.0.1", "[::1]")
    verify = (not loopback) if tls_verify is None else tls_verify
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        result = subprocess.run(
            [_require("buildah", "buildah"), *storage_args(), "push", f"--tls-verify={str(verify).lower()}",
             "--digestfile", str(digest_file), img.reference, f"docker://{destination}"],
            capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            last = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ImageError(f"the registry {registry} refused the push of {destination} ({' '.join(last)}): "
                             "check that it is running and writable, and its TLS (--tls-verify) and credentials")
        return digest_file.read_text().strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "build"
    try:
        if command not in ("build", "push", "root"):
            raise ImageError(f"unknown command {command!r}: build, push REGISTRY, or root")
        if command == "push" and (len(args) != 2 or not args[1]):
            raise ImageError("usage: make image-push REGISTRY=host:port")
        img = ensure_image()
        if command == "build":
            print(f"{img.reference} ({img.id[:12]}, {image_size(img.reference)}, "
                  f"{'built' if img.built else 'cached'} in {img.seconds:.0f} s), also tagged {img.version_reference}")
        elif command == "push":
            digest = push(img, args[1])
            print(f"pushed {args[1].rstrip('/')}/meshtls:{project_version()}@{digest}")
        else:
            print(image_root(img))
    except ImageError as exc:
        print(f"make {'image-push' if command == 'push' else 'image'}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
