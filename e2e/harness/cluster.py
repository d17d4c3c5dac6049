"""The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok on 127.0.0.1.

`Cluster.start()` reuses a healthy cluster of ours, or uses the cluster of $KUBECONFIG when
MESHTLS_USE_EXISTING_CLUSTER=1, or else builds what is missing and starts a fresh one. Only a cluster that
this object started is stopped by `stop()`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from . import build, certs, processes
from .paths import state_dir

USE_EXISTING_ENV = "MESHTLS_USE_EXISTING_CLUSTER"
KWOK_NODES = ("kwok-node-0", "kwok-node-1")
_STATE_FILE = "state.json"
_MARKER = ".meshtls-harness"  # only a directory holding this file is ever removed


def _remove_state_dir(path: Path) -> None:
    if (path / _MARKER).exists() or (path / _STATE_FILE).exists():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() and any(path.iterdir()):
        raise HarnessError(f"{path} is not a harness state dir (no {_MARKER}): not touching it")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class HarnessError(RuntimeError):
    """Something the user has to act on; the message says what."""


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@dataclass
class Proc:
    name: str
    pid: int
    argv: list[str]
    log: str
    env: dict[str, str]


class _Api:
    """Just enough of a REST client (admin client certificate) to bootstrap and probe the cluster."""

    def __init__(self, url: str, pki: Path) -> None:
        self.url = url
        self._ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self._ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str) -> dict[str, Any] | None:
        status, body = self.call("GET", path)
        return json.loads(body) if status == 200 else None

    def ready(self) -> bool:
        status, body = self.call("GET", "/readyz")
        return status == 200 and body == b"ok"


def _https_ok(port: int) -> bool:
    """The /healthz of kube-controller-manager or kube-scheduler (self-signed serving certificate)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _node(name: str) -> dict[str, Any]:
    resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "status": {
            "allocatable": resources,
            "capacity": resources,
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake"},
        },
    }


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    with build.file_lock(state_dir().with_name(state_dir().name + ".lock")):
        yield


class Cluster:
    def __init__(self, kubeconfig: Path, *, state: dict[str, Any] | None, owned: bool) -> None:
        self.kubeconfig = kubeconfig
        self.owned = owned
        self._state = state
        self._cleanup_registered = False

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def start(cls, *, cleanup_on_exit: bool = False, log: Log = _stderr) -> Cluster:
        """Returns a usable cluster: an existing one (see the module doc) or a freshly started one.

        With `cleanup_on_exit`, a cluster started here is also stopped at interpreter exit and on
        SIGTERM/SIGHUP.
        """
        if os.environ.get(USE_EXISTING_ENV) == "1":
            return cls._external(log)
        with _lock():
            running = cls.running()
            if running is not None:
                log(f"reusing the running cluster ({running.kubeconfig})")
                return running
            cls._remove_stale(log)
            kubeconfig = os.environ.get("KUBECONFIG")
            if kubeconfig and not certs.made_by_harness(Path(kubeconfig)):
                log(f"note: ignoring KUBECONFIG={kubeconfig}; set {USE_EXISTING_ENV}=1 to test against it")
            build.build_all(log)
            cluster = cls._launch(log)
        if cleanup_on_exit:
            cluster.register_cleanup()
        return cluster

    @classmethod
    def running(cls) -> Cluster | None:
        """Our cluster, if its state file says one runs and it is healthy."""
        state = cls._read_state()
        if state is None:
            return None
        cluster = cls(Path(state["kubeconfig"]), state=state, owned=False)
        return cluster if cluster.healthy() else None

    @classmethod
    def _external(cls, log: Log) -> Cluster:
        kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        if not kubeconfig or not Path(kubeconfig).is_file():
            raise HarnessError(f"{USE_EXISTING_ENV}=1 needs KUBECONFIG set to an existing kubeconfig file")
        cluster = cls(Path(kubeconfig), state=None, owned=False)
        result = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=30)
        if result.returncode != 0:
            raise HarnessError(
                f"the cluster of KUBECONFIG={kubeconfig} is not ready: {result.stderr.strip()}"
            )
        log(f"using the existing cluster of KUBECONFIG={kubeconfig}")
        return cluster

    # ---- properties ------------------------------------------------------------------------------

    @property
    def external(self) -> bool:
        return self._state is None

    @property
    def state_dir(self) -> Path:
        return state_dir()

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def api_server_url(self) -> str:
        if self._state is not None:
            return str(self._state["api_server_url"])
        config = yaml.safe_load(self.kubeconfig.read_text())
        context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
        return str(
            next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]["server"]
        )

    @property
    def processes(self) -> list[Proc]:
        return [Proc(**p) for p in (self._state or {}).get("components", [])]

    def bin(self, name: str) -> Path:
        """Path of a cached binary: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
        kwok, helm. Builds its component when missing."""
        path = build.binary(name)
        if not path.is_file():
            build.build_component(build.BINARIES[name])
        return path

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at this cluster, for subprocesses."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cached kubectl (v1.34.1) on this cluster; raises KubectlError on failure if `check`."""
        kubectl = build.binary("kubectl")
        exe = str(kubectl) if kubectl.is_file() else shutil.which("kubectl") or str(self.bin("kubectl"))
        argv = [exe, "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    # ---- health ----------------------------------------------------------------------------------

    def healthy(self) -> bool:
        if self._state is None:
            return self.kubectl("get", "--raw", "/readyz", check=False, timeout=30).returncode == 0
        if not all(processes.runs_binary(p.pid, Path(p.argv[0])) for p in self.processes):
            return False
        try:
            return self._api().ready()
        except OSError:
            return False

    def _api(self) -> _Api:
        return _Api(self.api_server_url, self.state_dir / "pki")

    def _watch(self) -> None:
        """Raises when a component we started has exited."""
        for p in self.processes:
            if not processes.alive(p.pid):
                tail = processes.log_tail(Path(p.log), 3)
                raise processes.ComponentError(
                    f"{p.name} exited; see its log {p.log}" + (f"\nits last lines:\n{tail}" if tail else "")
                )

    # ---- start -----------------------------------------------------------------------------------

    @classmethod
    def _launch(cls, log: Log) -> Cluster:
        t0 = time.monotonic()
        sd = state_dir()
        _remove_state_dir(sd)
        (sd / "logs").mkdir(parents=True, exist_ok=True)
        (sd / _MARKER).touch()
        pki_dir = sd / "pki"
        pki = certs.PKI(pki_dir)
        serving = pki.apiserver()
        sa = pki.service_account_keys()
        ports: dict[str, int] = {}
        for name in (
            "etcd",
            "etcd-peer",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        ):
            port = processes.free_port()
            while port in ports.values():
                port = processes.free_port()
            ports[name] = port
        url = f"https://127.0.0.1:{ports['kube-apiserver']}"
        kubeconfigs: dict[str, Path] = {}
        for user, org in (
            ("admin", "system:masters"),
            ("kube-controller-manager", None),
            ("kube-scheduler", None),
        ):
            cn = "meshtls-admin" if user == "admin" else f"system:{user}"
            pair = pki.issue(user, cn, org=org, client=True)
            kubeconfigs[user] = sd / ("kubeconfig" if user == "admin" else f"{user}.kubeconfig")
            certs.write_kubeconfig(kubeconfigs[user], url, pki.ca.cert, pair, cn)

        state: dict[str, Any] = {
            "api_server_url": url,
            "kubeconfig": str(kubeconfigs["admin"]),
            "ports": ports,
            "components": [],
            "started_at": time.time(),
        }
        cluster = cls(kubeconfigs["admin"], state=state, owned=True)
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"

        def serve_flags(name: str) -> list[str]:
            return [
                f"--kubeconfig={kubeconfigs[name]}",
                f"--authentication-kubeconfig={kubeconfigs[name]}",
                f"--authorization-kubeconfig={kubeconfigs[name]}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports[name]}",
                f"--cert-dir={pki_dir / name}",
                "--leader-elect=false",
                "--profiling=false",
            ]

        argvs: dict[str, list[str]] = {
            "etcd": [
                str(build.binary("etcd")),
                "--name=meshtls",
                f"--data-dir={sd / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=meshtls={peer_url}",
                "--unsafe-no-fsync=true",
            ],
            "kube-apiserver": [
                str(build.binary("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-apiserver']}",
                f"--cert-dir={pki_dir / 'kube-apiserver'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={certs.SERVICE_CIDR}",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
                "DefaultTolerationSeconds,NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
                "ResourceQuota,PodSecurity",
                "--profiling=false",
            ],
            "kube-controller-manager": [
                str(build.binary("kube-controller-manager")),
                *serve_flags("kube-controller-manager"),
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                f"--service-cluster-ip-range={certs.SERVICE_CIDR}",
            ],
            "kube-scheduler": [str(build.binary("kube-scheduler")), *serve_flags("kube-scheduler")],
            "kwok": [
                str(build.binary("kwok")),
                f"--kubeconfig={kubeconfigs['admin']}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--server-address=127.0.0.1:{ports['kwok']}",
                "--cidr=10.244.0.1/16",
                # Renew node Leases (kube-controller-manager's heartbeat); without them nodes turn NotReady
                # after 50 s and back.
                "--node-lease-duration-seconds=40",
                "--node-ip=127.0.0.1",
            ],
        }
        # kwok reads its config from $KWOK_WORKDIR/kwok.yaml (default ~/.kwok): keep a user's file out of it.
        envs = {"kwok": {"KWOK_WORKDIR": str(sd / "kwok")}}

        def spawn(name: str) -> None:
            log_file = sd / "logs" / f"{name}.log"
            env = envs.get(name, {})
            pid = processes.spawn(argvs[name], log_file, env={**os.environ, **env})
            state["components"].append(asdict(Proc(name, pid, argvs[name], str(log_file), env)))
            cluster._write_state()

        api = _Api(url, pki_dir)
        try:
            spawn("etcd")
            processes.wait_for(
                "etcd to be healthy", lambda: _http_ok(etcd_url + "/health"), 30, cluster._watch
            )
            spawn("kube-apiserver")
            processes.wait_for("kube-apiserver /readyz", api.ready, 90, cluster._watch)
            for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
                spawn(name)
            for name in KWOK_NODES:
                status, body = api.call("POST", "/api/v1/nodes", _node(name))
                if status not in (201, 409):
                    raise HarnessError(f"creating node {name} failed: HTTP {status} {body[:300]!r}")
            processes.wait_for(
                "the default ServiceAccount (kube-controller-manager)",
                lambda: api.get_json("/api/v1/namespaces/default/serviceaccounts/default") is not None,
                60,
                cluster._watch,
            )
            processes.wait_for(
                "kube-scheduler /healthz", lambda: _https_ok(ports["kube-scheduler"]), 60, cluster._watch
            )
            processes.wait_for(
                "kwok nodes to be Ready",
                lambda: all(_node_ready(api, n) for n in KWOK_NODES),
                60,
                cluster._watch,
            )
        except BaseException as e:
            cluster._stop_processes()
            # Keep the logs for the error message; the next `up` removes the rest.
            (sd / _STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(sd / "etcd", ignore_errors=True)
            if isinstance(e, processes.ComponentError | TimeoutError):
                raise HarnessError(f"starting the cluster failed: {e}") from e
            raise
        log(f"cluster ready in {time.monotonic() - t0:.1f} s: {url} (logs: {sd / 'logs'})")
        return cluster

    # ---- stop / restart --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops the cluster if this object started it (a reused or external cluster is left running)."""
        if self.owned and self._state is not None:
            self._stop_processes()
            _remove_state_dir(self.state_dir)
            self._state = None
            self.owned = False

    def _stop_processes(self) -> None:
        """Clients first, then kube-apiserver, then etcd: each exits in about a second that way."""
        ours = {p.name: p.pid for p in self.processes if processes.runs_binary(p.pid, Path(p.argv[0]))}
        last = ("kube-apiserver", "etcd")
        processes.stop([pid for name, pid in ours.items() if name not in last])
        for name in last:
            if name in ours:
                processes.stop([ours[name]])
        processes.wait_reaped(ours.values())

    @classmethod
    def down(cls, log: Log = _stderr) -> bool:
        """Stops our cluster, whoever started it; returns whether there was one."""
        with _lock():
            state = cls._read_state()
            if state is None:
                _remove_state_dir(state_dir())  # what a failed start left for its error message
                return False
            cluster = cls(Path(state["kubeconfig"]), state=state, owned=True)
            cluster.stop()
            leftover = [p for p in state.get("ports", {}).values() if processes.port_in_use(p)]
            if leftover:
                log(f"warning: ports still in use after stopping: {leftover}")
            return True

    def restart_apiserver(self, timeout: float = 90) -> None:
        """Stops kube-apiserver (SIGTERM), starts it again with the same flags and port, waits for /readyz."""
        if self._state is None:
            raise HarnessError(
                "restart_apiserver needs a cluster started by the harness, not an external one"
            )
        comps = self._state["components"]
        index = next(i for i, p in enumerate(comps) if p["name"] == "kube-apiserver")
        proc = Proc(**comps[index])
        processes.stop([proc.pid])
        port = self._state["ports"]["kube-apiserver"]
        processes.wait_for(f"port {port} to be free", lambda: not processes.port_in_use(port), 30)
        comps[index]["pid"] = processes.spawn(proc.argv, Path(proc.log), env={**os.environ, **proc.env})
        self._write_state()
        processes.wait_for("kube-apiserver /readyz after restart", self._api().ready, timeout, self._watch)

    @classmethod
    def _remove_stale(cls, log: Log) -> None:
        """A state dir without a healthy cluster (killed harness, reboot): stop what is left and remove it."""
        state = cls._read_state()
        if state is not None:
            log("removing the state of a cluster that is no longer healthy")
            cls(Path(state["kubeconfig"]), state=state, owned=True).stop()
        else:
            _remove_state_dir(state_dir())

    def register_cleanup(self) -> None:
        """Stops the cluster at interpreter exit; SIGTERM/SIGHUP become KeyboardInterrupt (as Ctrl-C: pytest
        then ends the run and tears its fixtures down), so the exit handlers run."""
        if self._cleanup_registered:
            return
        self._cleanup_registered = True
        atexit.register(self.stop)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not in the main thread
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    signal.signal(sig, on_signal)

    # ---- state file ------------------------------------------------------------------------------

    def _write_state(self) -> None:
        path = self.state_dir / _STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(path)

    @staticmethod
    def _read_state() -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((state_dir() / _STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return state


def _node_ready(api: _Api, name: str) -> bool:
    node = api.get_json(f"/api/v1/nodes/{name}")
    conditions = (node or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
