"""The image, built and run for real (issue #17): what was pushed to a real registry, how it runs, and the
post-quantum key exchange between two sidecars running from it.

`make image` builds it with buildah on a Debian trixie base (testsupport.image); the session pushes it to a
loopback `docker-registry`; skopeo (an independent client) reads it back. The e2e kubelet runs every injected
sidecar from the image's root (testsupport.containers), unless MESHTLS_SIDECAR_FROM=venv.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from testsupport import image
from testsupport.containers import ImageRuntime, image_runtime, sidecar_runtime
from testsupport.image import IMAGE_USER, Image, ImageError, push
from testsupport.kubelet import SidecarProcess, write_atomic_volume
from testsupport.proxymesh import TcpApp, Workload, echo, free_ports, metric, roundtrip

from e2e.conftest import PushedImage
from e2e.kube_helpers import Kube
from e2e.mesh import Mesh, http_get
from e2e.operator_process import OperatorProcess, free_port
from e2e.registry import LoopbackRegistry, skopeo_inspect
from meshtls.dataplane.config import parse_sidecar_config
from meshtls.dataplane.envoy import envoy_arguments, render_envoy_files
from meshtls.dataplane.layout import BUNDLE_DIR, CONFIG_DIR, IDENTITY_DIR
from meshtls.pki import generate_ca

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
PQ_GROUP = "X25519MLKEM768"
FS_GROUP = 2000


def run_in_image(runtime: ImageRuntime, *command: str, mounts: dict[str, Path] | None = None,
                 input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv, env = runtime.launch(command, mounts or {})
    return subprocess.run(argv, env=env, capture_output=True, text=True, input=input, timeout=timeout)


# --- what was pushed ----------------------------------------------------------------------------------------------


def test_the_pushed_image_carries_the_entrypoints_runs_as_65532_and_has_no_pip(
    pushed_image: PushedImage, tmp_path: Path,
) -> None:
    manifest = skopeo_inspect(pushed_image.reference)
    assert manifest["Digest"] == pushed_image.digest
    config = skopeo_inspect(pushed_image.reference, config=True)["config"]
    assert config["User"] == IMAGE_USER
    assert config["Cmd"] == ["meshtls", "--help"] and not config.get("Entrypoint")
    path = next(e.split("=", 1)[1] for e in config["Env"] if e.startswith("PATH="))
    assert path.split(":")[0] == "/opt/meshtls/bin"

    # the layers as the registry serves them: the three programs are there, and nothing that installs or compiles
    copy = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{pushed_image.reference}",
                           f"dir:{tmp_path / 'image'}"], capture_output=True, text=True, timeout=300)
    assert copy.returncode == 0, copy.stderr
    raw = skopeo_inspect(pushed_image.reference, raw=True)
    members: dict[str, tarfile.TarInfo] = {}
    for layer in raw["layers"]:
        with tarfile.open(tmp_path / "image" / layer["digest"].split(":", 1)[1]) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                parent, base = os.path.split(name)
                if base.startswith(".wh."):  # a whiteout: a later layer removed this path (or all of parent's)
                    gone = parent if base == ".wh..wh..opq" else os.path.join(parent, base[4:])
                    members = {n: m for n, m in members.items() if n != gone and not n.startswith(gone + "/")}
                else:
                    members[name] = member
    for program in ("meshtls", "meshtls-proxy"):
        member = members[f"opt/meshtls/bin/{program}"]
        assert member.isfile() and member.mode & 0o111, program
    assert members["opt/meshtls/bin/envoy"].issym()
    envoy_target = members["opt/meshtls/bin/envoy"].linkname.lstrip("/")
    assert members[envoy_target].isfile() and members[envoy_target].size > 50_000_000  # the real Envoy
    shipped = set(members)
    assert not [n for n in shipped if n.endswith(("/bin/pip", "/bin/pip3", "/bin/gcc", "/bin/cc"))]
    assert not [n for n in shipped if "/site-packages/pip/" in n or "python-wheels/pip" in n]


def test_the_image_runs_as_65532_on_a_read_only_root(built_image: Image) -> None:
    runtime = image_runtime()
    script = ("id -u; id -g; python3 -c 'import ssl; print(ssl.OPENSSL_VERSION)'; "
              "touch /opt/x 2>/dev/null && echo root-writable || echo root-read-only; "
              "python3 -m pip --version >/dev/null 2>&1 && echo pip || echo no-pip; "
              "command -v gcc cc >/dev/null && echo compiler || echo no-compiler")
    result = run_in_image(runtime, "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[:2] == ["65532", "65532"]
    assert lines[2].startswith("OpenSSL 3.5"), lines[2]
    assert lines[3:6] == ["root-read-only", "no-pip", "no-compiler"], result.stdout
    for command in (("meshtls", "--version"), ("meshtls-proxy", "--help"), ("envoy", "--version")):
        done = run_in_image(runtime, *command)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"


# --- bad input: one line that says what and how to fix, nothing half-built left tagged ------------------------


def _image_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testsupport.image", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=os.environ | env)


def test_a_missing_buildah_says_how_to_install_it(tmp_path: Path) -> None:
    result = _image_command("build", env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == ("make image: buildah is not installed: apt-get install buildah "
                                     "(bash .ci/run installs it)"), result.stderr


def test_a_failed_debootstrap_says_what_and_tags_nothing(tmp_path: Path) -> None:
    closed = free_port()
    cache = tmp_path / "cache"
    result = _image_command("build", env={"MESHTLS_IMAGE_CACHE": str(cache),
                                          "MESHTLS_DEBIAN_MIRROR": f"http://127.0.0.1:{closed}/debian"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("make image: debootstrap trixie from http://127.0.0.1:") and \
        "MESHTLS_DEBIAN_MIRROR" in lines[-1], result.stderr
    assert all(line.startswith("image: ") for line in lines[:-1]), result.stderr  # progress, then the one error
    images = subprocess.run(["buildah", "--root", str(cache / "storage"), "--runroot", str(cache / "run"),
                             "--storage-driver", "vfs", "images", "--quiet"], capture_output=True, text=True)
    containers = subprocess.run(["buildah", "--root", str(cache / "storage"), "--runroot", str(cache / "run"),
                                 "--storage-driver", "vfs", "containers", "--quiet"], capture_output=True, text=True)
    assert images.stdout.strip() == "" and containers.stdout.strip() == ""
    assert not list((cache / "tmp").glob("*")), "the debootstrap root was left behind"


def test_a_failed_dockerfile_build_says_where_its_log_is_and_tags_nothing(built_image: Image, tmp_path: Path) -> None:
    """A tree whose Dockerfile fails at a RUN step, built in the real cache (on the real base)."""
    repo = tmp_path / "repo"
    (repo / "operator").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        (repo / name).write_bytes((REPO / name).read_bytes())
    (repo / "Dockerfile").write_text("ARG PYTHON_IMAGE=python:3.11-slim-bookworm\nFROM ${PYTHON_IMAGE}\n"
                                     "RUN echo a broken step && false\n")

    def state() -> tuple[list[tuple[str, list[str]]], str]:
        images = json.loads(image.buildah("images", "--json"))
        return sorted((i["id"], sorted(i["names"] or [])) for i in images), image.buildah("containers", "--quiet")

    before = state()
    result = subprocess.run([sys.executable, "-c", "import sys, pathlib; from testsupport import image; "
                             f"image.REPO = pathlib.Path({str(repo)!r}); sys.exit(image.main(['build']))"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("make image: buildah bud of the Dockerfile failed") and "a broken step" in last, last
    assert f"full log {image.CACHE / 'build.log'}" in last, last
    assert state() == before  # nothing tagged, no build container left


def test_a_registry_that_refuses_the_push_says_so(built_image: Image) -> None:
    with LoopbackRegistry(read_only=True) as registry, pytest.raises(ImageError) as refused:
        push(built_image, registry.address)
    message = str(refused.value)
    assert "\n" not in message and f"the registry {registry.address} refused the push" in message, message
    with pytest.raises(ImageError, match="refused the push"):
        push(built_image, f"127.0.0.1:{free_port()}")  # nothing listening


def test_make_image_push_pushes_to_the_given_registry(built_image: Image) -> None:
    with LoopbackRegistry() as registry:
        result = subprocess.run(["make", "--no-print-directory", "image-push", f"REGISTRY={registry.address}"],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        pushed = skopeo_inspect(f"{registry.address}/meshtls:{built_image.version_reference.rsplit(':', 1)[1]}")
        assert f"@{pushed['Digest']}" in result.stdout, result.stdout
    bad = subprocess.run(["make", "--no-print-directory", "image-push", "REGISTRY="], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode != 0 and "usage: make image-push REGISTRY=host:port" in bad.stderr


# --- sidecars from the image: post-quantum between them, proven with the image's own openssl ---------------------


@pytest.fixture
def mesh(kube: Kube, kube_api: client.ApiClient, operator: OperatorProcess, trust_domain: str,
         tmp_path: Path) -> Iterator[Mesh]:
    if not operator.running:
        operator.start()
    # the sidecars' directories must be reachable for bind mounts; pytest's tmp_path is fine (binds ignore modes)
    m = Mesh(kube, kube_api, Path(tempfile.mkdtemp(prefix="meshtls-image-e2e-", dir=tmp_path)))
    yield m
    m.close()


def test_two_sidecars_from_the_image_negotiate_x25519mlkem768(mesh: Mesh, trust_domain: str) -> None:
    runtime = sidecar_runtime()
    assert isinstance(runtime, ImageRuntime), f"sidecars from the image are the point here, not {runtime.name}"
    ns = mesh.namespace("e2e-image")
    server_tls, app, client_out = free_port(), free_port(), free_port()
    mesh.identity(ns, "server", {"inbound": [{"port": server_tls, "appPort": app}],
                                 "allowedPeers": [f"spiffe://{trust_domain}/ns/{ns}/sa/client"]})
    mesh.identity(ns, "client", {"outbound": [{"listenPort": client_out, "address": f"127.0.0.1:{server_tls}",
                                               "peer": f"spiffe://{trust_domain}/ns/{ns}/sa/server"}]})
    mesh.echo_app(app)
    # the server pod sets an fsGroup: its key is then 0440, group fsGroup, readable through the supplementary group
    server, client_ = mesh.pod(ns, "server", {"fsGroup": FS_GROUP}), mesh.pod(ns, "client")
    key = (server.host_path("/var/run/meshtls/identity") / "tls.key").resolve()
    assert (key.stat().st_mode & 0o777, key.stat().st_gid) == (0o440, FS_GROUP)
    for _ in range(3):
        assert http_get(client_out) == (200, b"echo /hello")

    # the processes really are the image's: its root, the container's uid, a read-only root
    for sidecar in (server, client_):
        assert sidecar.process is not None and sidecar.process.process is not None
        pid = sidecar.process.process.pid
        assert os.path.realpath(f"/proc/{pid}/root") == os.path.realpath(runtime.root)
        status = Path(f"/proc/{pid}/status").read_text()
        assert next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:] == ["65532"] * 4
        groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
        assert sorted(groups) == sorted(["65532", str(FS_GROUP)] if sidecar is server else ["65532"]), groups
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        root_mount = next(line for line in mounts if line.split()[4] == "/")  # mount points seen from its root
        assert "ro" in root_mount.split()[5].split(","), root_mount

    assert server.process is not None and client_.process is not None
    inbound = metric(server.process.metrics(), "meshtls_proxy_tls_groups_total", direction="inbound", group=PQ_GROUP)
    outbound = metric(client_.process.metrics(), "meshtls_proxy_tls_groups_total", direction="outbound",
                      group=PQ_GROUP)
    assert inbound >= 3 and outbound >= 3, server.process.metrics()

    # an independent client: the image's OpenSSL 3.5 s_client, offering ML-KEM only, with the client's identity
    identity = client_.host_path("/var/run/meshtls/identity")
    bundle = client_.host_path("/var/run/meshtls/bundle")
    s_client = run_in_image(
        runtime, "openssl", "s_client", "-connect", f"127.0.0.1:{server_tls}", "-groups", PQ_GROUP,
        "-cert", "/var/run/meshtls/identity/tls.crt", "-key", "/var/run/meshtls/identity/tls.key",
        "-CAfile", "/var/run/meshtls/bundle/ca.crt", "-ign_eof",
        mounts={"/var/run/meshtls/identity": identity, "/var/run/meshtls/bundle": bundle},
        input="GET /pq HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = s_client.stdout
    assert f"Negotiated TLS1.3 group: {PQ_GROUP}" in out, out + s_client.stderr
    assert "Verify return code: 0 (ok)" in out and "echo /pq" in out, out + s_client.stderr
    assert metric(server.process.metrics(), "meshtls_proxy_tls_groups_total", direction="inbound",
                  group=PQ_GROUP) == inbound + 1
    print(f"\nsidecars from {runtime.reference}: inbound {PQ_GROUP} x{inbound + 1:.0f}, outbound x{outbound:.0f}")


def test_envoy_from_the_image_and_meshtls_proxy_from_the_image_negotiate_x25519mlkem768(
    built_image: Image, tmp_path: Path,
) -> None:
    """The second data plane's binary comes from the image too: an Envoy inbound sidecar (the config meshtls renders,
    bound at the pod's mount paths), called by meshtls-proxy and by `openssl s_client`, both from the image."""
    runtime = image_runtime()
    ca = generate_ca("example.org", dt.datetime.now(dt.UTC))
    server, caller = Workload("server", tmp_path, ca), Workload("client", tmp_path, ca)
    app, inbound, outbound = TcpApp(echo), *free_ports(2)
    config = parse_sidecar_config(server.config(
        inbound=[{"port": inbound, "appPort": app.port, "allow": [caller.spiffe_id]}]) | {
        "identityDir": IDENTITY_DIR, "bundleDir": BUNDLE_DIR})
    envoy_dir = tmp_path / "envoy-config"
    write_atomic_volume(envoy_dir, {k: v.encode() for k, v in render_envoy_files(config, CONFIG_DIR).items()})
    mounts = {IDENTITY_DIR: server.identity_dir, BUNDLE_DIR: server.bundle_dir, CONFIG_DIR: envoy_dir}
    argv, env = runtime.launch(["envoy", *envoy_arguments(CONFIG_DIR), "-l", "warning"], mounts)
    log_path = tmp_path / "envoy.log"
    with open(log_path, "wb") as log:
        envoy = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    proxy = SidecarProcess(caller.config(outbound=[{"listenPort": outbound, "address": f"127.0.0.1:{inbound}",
                                                    "peer": server.spiffe_id}]),
                           caller.identity_dir, caller.bundle_dir, tmp_path / "proxy-config", runtime=runtime)
    try:
        deadline = time.monotonic() + 30
        while not _envoy_ready(config.admin_port):
            assert envoy.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert os.path.realpath(f"/proc/{envoy.pid}/root") == os.path.realpath(runtime.root)
        with proxy:
            assert roundtrip(outbound, b"through envoy") == b"through envoy"
            assert metric(proxy.metrics(), "meshtls_proxy_tls_groups_total", direction="outbound",
                          group=PQ_GROUP) == 1, proxy.metrics()
        # s_client stays connected (-ign_eof) until the app's echo is back, then it is stopped
        argv, env = runtime.launch(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{inbound}", "-groups", PQ_GROUP, "-cert",
             f"{IDENTITY_DIR}/tls.crt", "-key", f"{IDENTITY_DIR}/tls.key", "-CAfile", f"{BUNDLE_DIR}/ca.crt",
             "-ign_eof"], {IDENTITY_DIR: caller.identity_dir, BUNDLE_DIR: caller.bundle_dir})
        output = _converse(argv, env, b"ping\n", until=b"ping\n")  # the echo, right after the ticket dump
        assert f"Negotiated TLS1.3 group: {PQ_GROUP}" in output, output
        assert "Verify return code: 0 (ok)" in output, output
        # and Envoy's own count: every handshake it made used the hybrid group (`ssl.curves.<name>`)
        with urllib.request.urlopen(f"http://127.0.0.1:{config.admin_port}/stats?filter=ssl.curves", timeout=5) as r:
            curves = dict(line.split(": ") for line in r.read().decode().splitlines() if ": " in line)
        assert {k.rsplit(".", 1)[-1]: int(v) for k, v in curves.items() if int(v)} == {PQ_GROUP: 2}, curves
    finally:
        envoy.terminate()
        envoy.wait(10)
        app.close()


def _envoy_ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as response:
            return response.read().decode().strip() == "LIVE"
    except OSError:
        return False


def _converse(argv: list[str], env: dict[str, str], send: bytes, until: bytes, timeout: float = 20) -> str:
    """Runs argv, writes `send` to it, reads its output until `until` shows up (or the timeout), then stops it."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(send)
    proc.stdin.flush()
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while until not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
    finally:
        proc.kill()
        proc.wait(5)
    assert until in output, output.decode(errors="replace")
    return output.decode(errors="replace")
