"""Section 4: meshtls-proxy vs nginx (stream module) on loopback, same certificates, mutual TLS both ways.

    client --plain--> client-side proxy --mTLS--> server-side proxy --plain--> app (bench.dpapp, own process)

meshtls: two real `meshtls-proxy` processes with operator-shaped configs (outbound with a peer SPIFFE ID; inbound
with an allow-list), kubelet-style volumes (hot reload polling on), a CRL in the bundle, the admin/metrics endpoint,
access log as injected (on). nginx: two instances, one worker each, `proxy_ssl` with a client certificate and
verification on one side, `ssl_verify_client on` on the other, the same CRL on both, proxy_buffer_size 64k.

Measured per stack, with the CPU of both proxies of the pair from /proc/<pid>/stat (nginx: master + worker):
  - CPU seconds per GiB moved (client uploads, app counts and answers), best of `rounds`
  - new mTLS handshakes per proxy CPU second: one connection per request; resumption off on both stacks
    (meshtls --session-tickets 0; nginx ssl_session_tickets off, proxy_ssl_session_reuse off) = full handshakes;
    and again with each stack's defaults (resumption on)
  - latency added at `rate` requests/s of 1 KiB on 10 keep-alive connections: p50/p99 through the pair minus the
    same percentile going straight to the app, measured in the same run
  - RSS of each proxy (nginx: master + worker) after the runs
"""

from __future__ import annotations

import asyncio
import datetime as dt
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

from testsupport.kubelet import SidecarProcess, bundle_files, identity_files, write_atomic_volume

from bench.common import Knobs, LoadMeter, Profiler, children, cpu_seconds, pct, prom_value, pss_bytes, rss_bytes, say
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

TD = "dp.meshtls.test"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
PAYLOAD = 1024


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

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for name, pids in self.processes().items():
            out[name] = round(sum(rss_bytes(p) for p in pids) / 2**20, 1)
        return out

    def pss_mb(self) -> dict[str, float]:
        return {name: round(sum(pss_bytes(p) for p in pids) / 2**20, 1) for name, pids in self.processes().items()}

    def stop(self) -> None:
        pass


class Direct(Stack):
    name = "direct"

    def __init__(self, app_port: int) -> None:
        self.entry_port = app_port


class Meshtls(Stack):
    name = "meshtls"

    def __init__(self, pki: Pki, root: Path, app_port: int, full_handshakes: bool) -> None:
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
                                     root / f"server-config-{mode}", log_file=root / f"meshtls-server-{mode}.log",
                                     extra_args=extra)
        self.client = SidecarProcess(client_cfg, root / "client" / "identity", root / "client" / "bundle",
                                     root / f"client-config-{mode}", log_file=root / f"meshtls-client-{mode}.log")
        self.server.start(timeout=30)
        self.client.start(timeout=30)

    def processes(self) -> dict[str, list[int]]:
        assert self.server.process is not None and self.client.process is not None
        return {"client-side": [self.client.process.pid], "server-side": [self.server.process.pid]}

    def handshake_counts(self) -> dict[str, float]:
        text = self.server.metrics() + self.client.metrics()
        resumed = next((n for n in ("meshtls_proxy_resumed_handshakes_total", "meshtls_proxy_resumed_total",
                                    "meshtls_proxy_handshakes_resumed_total") if n in text), "")
        return {"handshakes": prom_value(text, "meshtls_proxy_handshakes_total"),
                "resumed": prom_value(text, resumed) if resumed else float("nan")}

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


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


def _measure_cpu(stack: Stack, fn: Any) -> tuple[Any, float]:
    c0 = stack.cpu()
    out = fn()
    return out, stack.cpu() - c0


def run(knobs: Knobs, out: Path) -> dict[str, Any]:
    nginx = ensure_nginx()
    root = Path(tempfile.mkdtemp(prefix="meshtls-bench-dp-"))
    logs = out / "dataplane-logs"
    logs.mkdir(exist_ok=True)
    pki = Pki(root)
    app_port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "bench.dpapp", str(app_port)], stdout=subprocess.PIPE)
    assert app.stdout is not None
    app.stdout.readline()
    rounds = 1 if knobs.small else 2
    load = LoadMeter()
    result: dict[str, Any] = {"rounds": rounds, "bytes_per_run": knobs.dp_bytes, "handshakes_per_run":
                              knobs.dp_handshakes, "latency_rate": knobs.dp_rate, "latency_seconds": knobs.dp_seconds}
    stacks: dict[str, Stack] = {}
    try:
        # --- throughput and full handshakes: resumption off on both ---------------------------------------------
        stacks = {"meshtls": Meshtls(pki, root, app_port, True), "nginx": Nginx(nginx, pki, root, app_port, True)}
        tput: dict[str, list[float]] = {k: [] for k in stacks}
        hs: dict[str, list[float]] = {k: [] for k in stacks}
        hs_wall: dict[str, list[float]] = {k: [] for k in stacks}
        failed: dict[str, int] = {k: 0 for k in stacks}
        mesh0 = stacks["meshtls"]
        assert isinstance(mesh0, Meshtls)
        spies = [Profiler(pid, out / f"proxy-{side}.pyspy.txt") for side, (pid,) in mesh0.processes().items()]
        for r in range(rounds):
            if r == 1:
                for spy in spies:
                    spy.stop()
            for name, stack in stacks.items():
                (moved, secs), cpu = _measure_cpu(stack, lambda s=stack: throughput(s.entry_port, knobs.dp_bytes))
                tput[name].append(cpu / (moved / 2**30))
                say(f"data plane round {r + 1}: {name} moved {moved / 2**20:.0f} MiB in {secs:.1f} s "
                    f"({moved / 2**20 / secs:.0f} MiB/s), {cpu:.2f} proxy CPU-s = {tput[name][-1]:.2f} CPU-s/GiB")
            for name, stack in stacks.items():
                (ok, bad, secs), cpu = _measure_cpu(stack, lambda s=stack: handshakes(s.entry_port,
                                                                                       knobs.dp_handshakes))
                failed[name] += bad
                hs[name].append(ok / cpu if cpu else float("nan"))
                hs_wall[name].append(ok / secs)
                say(f"data plane round {r + 1}: {name} {ok} full handshakes ({bad} failed) in {secs:.1f} s, "
                    f"{cpu:.2f} proxy CPU-s = {hs[name][-1]:.0f} handshakes/CPU-s")
        for spy in spies:
            spy.stop()
        counts = mesh0.handshake_counts()
        # --- latency added at a fixed rate: short slices, stacks in turn, so bursts of noise hit all three ---------
        lat: dict[str, list[float]] = {"direct": [], "meshtls": [], "nginx": []}
        order: list[tuple[str, Stack]] = [("direct", Direct(app_port)), *stacks.items()]
        slices = max(1, knobs.dp_seconds // 5)
        for i in range(slices):
            for name, stack in order:
                lat[name] += latency(stack.entry_port, knobs.dp_rate, knobs.dp_seconds / slices)
            say(f"data plane: latency slice {i + 1}/{slices} at {knobs.dp_rate} req/s: " + ", ".join(
                f"{n} p50 {pct(v, 50) * 1e3:.3f} p99 {pct(v, 99) * 1e3:.3f} ms" for n, v in lat.items()))
        rss = {name: stack.rss_mb() for name, stack in stacks.items()}
        pss = {name: stack.pss_mb() for name, stack in stacks.items()}
        peak = {}
        for name, stack in stacks.items():
            peak[name] = {side: round(max(_hwm(p) for p in pids) / 2**20, 1)
                          for side, pids in stack.processes().items()}
        for stack in stacks.values():
            stack.stop()
        # --- handshakes with each stack's defaults (session resumption on) ------------------------------------
        stacks = {"meshtls": Meshtls(pki, root, app_port, False), "nginx": Nginx(nginx, pki, root, app_port, False)}
        hs_default: dict[str, list[float]] = {k: [] for k in stacks}
        for r in range(rounds):
            for name, stack in stacks.items():
                (ok, bad, secs), cpu = _measure_cpu(stack, lambda s=stack: handshakes(s.entry_port,
                                                                                       knobs.dp_handshakes))
                hs_default[name].append(ok / cpu if cpu else float("nan"))
                say(f"data plane round {r + 1}: {name} {ok} connections with resumption ({bad} failed): "
                    f"{hs_default[name][-1]:.0f} handshakes/CPU-s")
        mesh2 = stacks["meshtls"]
        assert isinstance(mesh2, Meshtls)
        counts_default = mesh2.handshake_counts()
        for stack in stacks.values():
            stack.stop()
        stacks = {}
    finally:
        for stack in stacks.values():
            stack.stop()
        app.terminate()
        app.wait(10)
        for log in root.glob("*.log"):
            shutil.copy(log, logs / log.name)
        for d in root.glob("nginx-*"):
            if (d / "error.log").exists():
                shutil.copy(d / "error.log", logs / f"{d.name}.error.log")
        shutil.rmtree(root, ignore_errors=True)

    def best_low(xs: list[float]) -> float:
        return min(xs)

    def best_high(xs: list[float]) -> float:
        return max(xs)

    m_gib, n_gib = best_low(tput["meshtls"]), best_low(tput["nginx"])
    m_hs, n_hs = best_high(hs["meshtls"]), best_high(hs["nginx"])
    m_hsd, n_hsd = best_high(hs_default["meshtls"]), best_high(hs_default["nginx"])
    direct50, direct99 = pct(lat["direct"], 50), pct(lat["direct"], 99)
    added = {name: {"p50_ms": round((pct(lat[name], 50) - direct50) * 1e3, 3),
                    "p99_ms": round((pct(lat[name], 99) - direct99) * 1e3, 3)} for name in ("meshtls", "nginx")}
    result.update({
        "cpu_s_per_gib": {"meshtls": round(m_gib, 3), "nginx": round(n_gib, 3), "all_rounds": tput},
        "handshakes_per_cpu_s": {"meshtls": round(m_hs, 1), "nginx": round(n_hs, 1), "all_rounds": hs,
                                 "wall_rate_per_s": hs_wall, "failed": failed, "meshtls_counters": counts},
        "handshakes_per_cpu_s_resumption_on": {"meshtls": round(m_hsd, 1), "nginx": round(n_hsd, 1),
                                               "all_rounds": hs_default, "meshtls_counters": counts_default},
        "latency_ms": {name: {"p50": round(pct(s, 50) * 1e3, 3), "p99": round(pct(s, 99) * 1e3, 3),
                              "requests": len(s)} for name, s in lat.items()},
        "latency_added_ms": added,
        "rss_mb": rss,  # nginx: master + worker
        "pss_mb": pss,
        "peak_rss_mb": peak,
        "ratios": {
            "cpu_per_gib_meshtls_over_nginx": round(m_gib / n_gib, 2),
            "handshakes_per_cpu_meshtls_over_nginx": round(m_hs / n_hs, 2),
            "handshakes_per_cpu_resumption_on_meshtls_over_nginx": round(m_hsd / n_hsd, 2),
        },
        "machine": load.result(),
        "goals": {
            "cpu_per_gib_no_worse_than_nginx": m_gib <= n_gib,
            "handshakes_per_cpu_at_least_0.9x_nginx": m_hs >= 0.9 * n_hs,
            "p99_added_under_1ms": added["meshtls"]["p99_ms"] < 1.0,
            "rss_per_sidecar_at_most_40mb": max(rss["meshtls"].values()) <= 40,
        },
    })
    say(f"data plane: meshtls {m_gib:.2f} vs nginx {n_gib:.2f} CPU-s/GiB; {m_hs:.0f} vs {n_hs:.0f} "
        f"handshakes/CPU-s; added p99 {added['meshtls']['p99_ms']:.3f} vs {added['nginx']['p99_ms']:.3f} ms; RSS {rss}")
    return result


def _hwm(pid: int) -> int:
    from bench.common import hwm_bytes

    try:
        return hwm_bytes(pid)
    except OSError:
        return 0

