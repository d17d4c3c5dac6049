"""What every benchmark section shares: knobs, progress, /proc sampling, a lean REST client, apiserver metrics."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
GROUP, VERSION = "meshtls.dev", "v1alpha1"
WID_PATH = f"/apis/{GROUP}/{VERSION}"
T0 = time.monotonic()


# --- knobs -----------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


@dataclass
class Knobs:
    """Scale of a run, from the environment (MESHTLS_BENCH_*)."""

    n: int = 1000  # identities issued at once, and floor objects; also the revocation storm
    steady_n: int = 10_000  # identities held in the steady-state section (twice: one namespace, then 50)
    namespaces: int = 4  # the issuance batch is spread over this many namespaces (each gets a bundle)
    workers: int = 16  # client threads creating/deleting objects (and the floor's workers)
    idle_seconds: int = 60  # steady-state CPU sampling window
    dp_bytes: int = 2 << 30  # data plane: bytes moved through each proxy pair
    dp_handshakes: int = 3000  # data plane: new connections (full mTLS handshakes) per stack
    dp_rate: int = 1000  # data plane: requests/s for the latency run
    dp_seconds: int = 15  # data plane: duration of the latency run
    small: bool = False
    sections: tuple[str, ...] = ("issuance", "steady", "revocation", "dataplane")

    @classmethod
    def from_env(cls) -> Knobs:
        small = os.environ.get("MESHTLS_BENCH_SMALL", "") not in ("", "0") or \
            os.environ.get("MESHTLS_BENCH_SMOKE", "") not in ("", "0")
        k = cls(small=small)
        if small:
            k = cls(n=50, steady_n=100, namespaces=2, idle_seconds=10, dp_bytes=128 << 20, dp_handshakes=300,
                    dp_rate=500, dp_seconds=4, small=True)
        k.n = _env_int("MESHTLS_BENCH_N", k.n)
        k.steady_n = max(_env_int("MESHTLS_BENCH_STEADY_N", max(k.steady_n, 2 * k.n)), k.n)
        k.namespaces = max(1, _env_int("MESHTLS_BENCH_NAMESPACES", k.namespaces))
        k.workers = _env_int("MESHTLS_BENCH_WORKERS", k.workers)
        k.idle_seconds = _env_int("MESHTLS_BENCH_IDLE_SECONDS", k.idle_seconds)
        k.dp_bytes = _env_int("MESHTLS_BENCH_DP_MIB", k.dp_bytes >> 20) << 20
        k.dp_handshakes = _env_int("MESHTLS_BENCH_DP_HANDSHAKES", k.dp_handshakes)
        k.dp_rate = _env_int("MESHTLS_BENCH_DP_RATE", k.dp_rate)
        k.dp_seconds = _env_int("MESHTLS_BENCH_DP_SECONDS", k.dp_seconds)
        if os.environ.get("MESHTLS_BENCH_SECTIONS"):
            k.sections = tuple(s.strip() for s in os.environ["MESHTLS_BENCH_SECTIONS"].split(",") if s.strip())
        return k


# --- progress --------------------------------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


# --- /proc -----------------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them (fair for master+workers)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def hwm_bytes(pid: int) -> int:
    """Peak RSS (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, to report how loaded it was."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


class LoadMeter:
    """Machine-wide CPU use (all cores, 0..ncores) and load average over a section: how noisy the run was."""

    def __init__(self) -> None:
        self.start = system_cpu()
        self.t = time.monotonic()

    def result(self) -> dict[str, float]:
        busy, total = system_cpu()
        frac = (busy - self.start[0]) / max(1.0, total - self.start[1])
        return {"machine_busy_cores": round(frac * (os.cpu_count() or 1), 2),
                "loadavg_1m": round(os.getloadavg()[0], 2)}


@dataclass
class CpuWatch:
    """CPU seconds of a set of processes between start() and stop(), and their peak RSS while sampled."""

    pids: dict[str, int]
    start_cpu: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def begin(self) -> CpuWatch:
        self.start_cpu = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for k, p in self.pids.items():
                try:
                    self.peak_rss[k] = max(self.peak_rss.get(k, 0), rss_bytes(p))
                except OSError:
                    pass

    def end(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.cpu = {k: round(cpu_seconds(p) - self.start_cpu[k], 3) for k, p in self.pids.items()}
        return self.cpu


# --- a lean REST client ----------------------------------------------------------------------------------------------


class Rest:
    """JSON over keep-alive HTTPS connections (one per thread), from a kubeconfig with embedded credentials.

    Much cheaper per request than the official client's models, so the load generator steals less CPU from
    the operator on a 2-core machine."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = config["current-context"]
        context = next(c for c in config["contexts"] if c["name"] == ctx_name)["context"]
        cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
        user = next(u for u in config["users"] if u["name"] == context["user"])["user"]
        self.server = cluster["server"]
        m = re.match(r"https://([^:/]+):(\d+)", self.server)
        assert m, self.server
        self.host, self.port = m.group(1), int(m.group(2))
        self._dir = tempfile.TemporaryDirectory(prefix="bench-rest-")
        d = Path(self._dir.name)
        (d / "ca.crt").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        (d / "tls.crt").write_bytes(base64.b64decode(user["client-certificate-data"]))
        (d / "tls.key").write_bytes(base64.b64decode(user["client-key-data"]))
        self.ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        self.ctx.load_cert_chain(str(d / "tls.crt"), str(d / "tls.key"))
        self._local = threading.local()

    def _conn(self, fresh: bool = False) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=60)
            self._local.conn = conn
        return conn

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             ok: tuple[int, ...] = (200, 201)) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        for attempt in range(3):
            conn = self._conn(fresh=attempt > 0)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                if attempt == 2:
                    raise
                continue
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = raw
            if resp.status == 429 or (resp.status >= 500 and attempt < 2):
                time.sleep(0.2)
                continue
            if resp.status not in ok:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {str(doc)[:300]}")
            return resp.status, doc
        raise RuntimeError(f"{method} {path}: retries exhausted")

    def get(self, path: str) -> Any:
        return self.call("GET", path)[1]

    def raw(self, path: str) -> str:
        conn = self._conn()
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.read().decode()

    def watch(self, path: str, resource_version: str | None = None) -> Watch:
        """Watch events (dicts with type and object) on their own connection; `close()` ends the iteration."""
        sep = "&" if "?" in path else "?"
        url = f"{path}{sep}watch=1&timeoutSeconds=3600"
        if resource_version:
            url += f"&resourceVersion={resource_version}"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=None)
        conn.request("GET", url)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"watch {path}: HTTP {resp.status} {resp.read()[:300]!r}")
        return Watch(conn, resp)


class Watch:
    def __init__(self, conn: http.client.HTTPSConnection, resp: http.client.HTTPResponse) -> None:
        self.conn, self.resp = conn, resp
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Decodes the chunked body by hand: one watch event per line, chunks as the apiserver flushes them."""
        fp = self.resp.fp
        buf = b""
        while not self.closed and fp is not None:
            try:
                size_line = fp.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = fp.read(size)
                fp.readline()  # the CRLF after the chunk
            except Exception as exc:  # close() shut the socket: the end
                if not self.closed:
                    print(f"watch ended: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
        if not self.closed:
            print("watch ended by the server", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.closed = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


# --- apiserver metrics -----------------------------------------------------------------------------------------------

_REQ = re.compile(r'^apiserver_request_total\{([^}]*)\}\s+([0-9.e+]+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
READ_VERBS = {"GET", "LIST"}
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"}


def request_counts(rest: Rest) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total summed over codes: (verb, resource, subresource) -> count."""
    text = rest.raw("/metrics")
    out: Counter[tuple[str, str, str]] = Counter()
    for labels, value in _REQ.findall(text):
        d = dict(_LABEL.findall(labels))
        out[(d.get("verb", ""), d.get("resource", ""), d.get("subresource", ""))] += int(float(value))
    return out


def diff_counts(after: Counter[tuple[str, str, str]], before: Counter[tuple[str, str, str]],
                resources: set[str]) -> dict[str, int]:
    """Request deltas for `resources`, keyed 'VERB resource[/sub]'."""
    out: dict[str, int] = {}
    for key, value in after.items():
        verb, res, sub = key
        if res not in resources:
            continue
        d = value - before.get(key, 0)
        if d:
            out[f"{verb} {res}{'/' + sub if sub else ''}"] = d
    return dict(sorted(out.items()))


def split_rw(delta: dict[str, int]) -> tuple[int, int]:
    reads = sum(v for k, v in delta.items() if k.split()[0] in READ_VERBS)
    writes = sum(v for k, v in delta.items() if k.split()[0] in WRITE_VERBS)
    return reads, writes


def prom_value(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- optional profiling (investigation only: py-spy is not installed by `make venv`) ---------------------------------


class Profiler:
    """py-spy on one process while MESHTLS_BENCH_PYSPY=1 (sampling only the GIL holder: where the CPU goes)."""

    def __init__(self, pid: int, out: Path) -> None:
        import shutil
        import subprocess

        self.out = out
        self.proc: Any = None
        if os.environ.get("MESHTLS_BENCH_PYSPY") != "1":
            return
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            say("MESHTLS_BENCH_PYSPY=1 but py-spy is not installed (pip install py-spy): no profile")
            return
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                                      "--nonblocking", "--gil", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        import signal

        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
        self.proc = None
        if self.out.exists():
            summarize_profile(self.out, self.out.with_suffix(".top.txt"))


def summarize_profile(raw: Path, out: Path, top: int = 60) -> None:
    """Inclusive and self share per function from py-spy's collapsed stacks."""
    total = 0
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else f
                  for f in stack.split(";")]
        for f in set(frames):
            incl[f] += n
        own[frames[-1]] += n
    if not total:
        return
    lines = [f"{total} samples (GIL holder only)", "", "inclusive:"]
    lines += [f"{v / total * 100:5.1f}%  {k}" for k, v in incl.most_common(top)]
    lines += ["", "self:"] + [f"{v / total * 100:5.1f}%  {k}" for k, v in own.most_common(top // 2)]
    out.write_text("\n".join(lines) + "\n")
