"""An in-process mesh for the proxy tests: certificates, apps, in-process sidecars, log capture.

Sidecars run in-process, each on its own event loop in a thread, with real sockets on 127.0.0.1 and volumes written
the kubelet's way (testsupport.kubelet.write_atomic_volume). Test code itself is plain blocking sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import hashlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtls.dataplane.config import parse_sidecar_config
from meshtls.pki import (
    CertificateAuthority,
    IssuedCertificate,
    RevokedCertificate,
    build_crl,
    crl_pem,
    issue_svid,
    workload_spiffe_id,
)
from meshtls.proxy.server import Proxy
from testsupport.kubelet import bundle_files, identity_files, write_atomic_volume

TD = "example.org"
RELOAD = 0.1  # seconds; the tests' reload interval


def spiffe(sa: str, ns: str = "default") -> str:
    return str(workload_spiffe_id(TD, ns, sa))


def issue(ca: CertificateAuthority, sa: str, ttl: dt.timedelta = dt.timedelta(hours=1),
          now: dt.datetime | None = None) -> IssuedCertificate:
    return issue_svid(ca, workload_spiffe_id(TD, "default", sa), now or dt.datetime.now(dt.UTC), ttl)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_rng = random.Random()
_handed_out: collections.deque[int] = collections.deque(maxlen=2048)  # the latest ports free_ports gave


def free_ports(n: int) -> list[int]:
    """Ports that are free now, picked below the ephemeral range so outgoing connections (of this or a parallel
    test run) cannot take them before a proxy binds them."""
    low = _ephemeral_low()
    ports: list[int] = []
    while len(ports) < n:
        port = _rng.randrange(10_000, max(low, 10_001))
        # a port handed out lately may not be bound yet (a mesh picks its listeners' and admin ports in separate
        # calls before any proxy starts): never the same one twice in a row of calls (CI failed on one such pair)
        if port in ports or port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    _handed_out.extend(ports)
    return ports


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port nothing listens on for as long as the block runs (bound, never listening: connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --- apps ------------------------------------------------------------------------------------------------------------


class TcpApp:
    """A threaded TCP server on 127.0.0.1; `handle(conn)` runs per connection in its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handle(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back (so a client that shut down its write side still gets everything)."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def digest_after_eof(conn: socket.socket) -> None:
    """Reads everything until the client's EOF, only then answers: the classic half-close request/response."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        h.update(data)
        total += len(data)
    conn.sendall(f"{total} {h.hexdigest()}\n".encode())
    conn.shutdown(socket.SHUT_WR)


# --- logs ------------------------------------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    def __init__(self, logger_name: str) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._lock_ = threading.Lock()
        self.logger = logging.getLogger(logger_name)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    def matching(self, *needles: str) -> list[str]:
        with self._lock_:
            return [line for line in self.lines if all(n in line for n in needles)]

    def wait_for(self, *needles: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(*needles)
            if found:
                return found[-1]
            time.sleep(0.01)
        raise AssertionError(f"no log line with {needles}; got:\n" + "\n".join(self.lines[-30:]))

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()


# --- sidecars --------------------------------------------------------------------------------------------------------


class ProxyThread:
    """A Proxy on its own event loop in a daemon thread."""

    def __init__(self, config: dict[str, Any], name: str) -> None:
        self.name = name
        self.config = parse_sidecar_config(config)
        self.proxy = Proxy(self.config, bind_address="127.0.0.1", name=name)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"proxy-{name}", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                await self.proxy.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                raise
            self._started.set()
            await self.proxy.wait_stopped()
            await self.proxy.shutdown(drain_seconds=0.5)

        with contextlib.suppress(BaseException):
            self.loop.run_until_complete(main())
        self.loop.close()

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._started.wait(10):
            raise TimeoutError(f"proxy {self.name} did not start")
        if self._error:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the proxy's loop and return its result."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def metrics(self) -> str:
        return str(self.call(lambda: self.proxy.metrics().decode()))

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.proxy.request_stop)
            self._thread.join(10)


@dataclass
class Workload:
    """One sidecar's volumes: identity (a Secret) and bundle (a ConfigMap), written like the kubelet does."""

    name: str
    root: Path
    ca: CertificateAuthority
    cert: IssuedCertificate = field(init=False)

    def __post_init__(self) -> None:
        self.identity_dir.mkdir(parents=True, exist_ok=True)
        self.bundle_dir.mkdir(parents=True, exist_ok=True)
        self.rotate()
        self.set_bundle(self.ca.roots_pem, crl_pem(build_crl(self.ca, [], 1, dt.datetime.now(dt.UTC))))

    @property
    def spiffe_id(self) -> str:
        return spiffe(self.name)

    @property
    def identity_dir(self) -> Path:
        return self.root / self.name / "identity"

    @property
    def bundle_dir(self) -> Path:
        return self.root / self.name / "bundle"

    def rotate(self, cert: IssuedCertificate | None = None) -> IssuedCertificate:
        self.cert = cert or issue(self.ca, self.name)
        write_atomic_volume(self.identity_dir, identity_files(self.cert.cert_chain_pem, self.cert.key_pem,
                                                              self.cert.ca_pem))
        return self.cert

    def set_bundle(self, roots_pem: bytes, crl: bytes | None) -> None:
        write_atomic_volume(self.bundle_dir, bundle_files(roots_pem, crl))

    def revoke(self, *certs: IssuedCertificate, number: int = 2) -> None:
        now = dt.datetime.now(dt.UTC)
        entries = [RevokedCertificate(c.serial_number, now, c.not_after) for c in certs]
        self.set_bundle(self.ca.roots_pem, crl_pem(build_crl(self.ca, entries, number, now)))

    def config(self, inbound: list[dict[str, Any]] = (), outbound: list[dict[str, Any]] = (),  # type: ignore[assignment]
               admin_port: int | None = None) -> dict[str, Any]:
        return {
            "spiffeId": self.spiffe_id,
            "identityDir": str(self.identity_dir),
            "bundleDir": str(self.bundle_dir),
            "inbound": list(inbound),
            "outbound": list(outbound),
            "admin": {"port": admin_port or free_ports(1)[0], "address": "127.0.0.1"},
            "reloadIntervalSeconds": RELOAD,
        }


def ssl_client_context(cert: IssuedCertificate | None, ca_pem: bytes, tmp: Path) -> ssl.SSLContext:
    """A plain Python TLS client (not a sidecar) for probing a server sidecar directly."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_pem.decode())
    if cert is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "c.pem").write_bytes(cert.cert_chain_pem)
        (tmp / "k.pem").write_bytes(cert.key_pem)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return ctx


def roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send payload to 127.0.0.1:port, half-close, read everything back until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def refused(port: int, payload: bytes = b"hello", timeout: float = 5.0) -> bool:
    """True when the connection is closed (or reset) without any byte coming back."""
    try:
        return roundtrip(port, payload, timeout) == b""
    except TimeoutError:
        return False
    except OSError:  # reset, broken pipe, not connected: closed on us
        return True


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text, parsed by prometheus_client's own parser (so the format is proven valid)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    return parse_metrics(text).get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def running(*threads: ProxyThread) -> Iterator[None]:
    started = []
    try:
        for t in threads:
            started.append(t.start())
        yield
    finally:
        for t in started:
            t.stop()


# --- a two-sidecar mesh -----------------------------------------------------------------------------------------


@dataclass
class Mesh:
    tmp: Path
    ca: CertificateAuthority
    server: Workload
    client: Workload
    server_proxy: ProxyThread
    client_proxy: ProxyThread
    app: TcpApp
    inbound_port: int
    outbound_port: int
    server_log: LogCapture
    client_log: LogCapture
    extra: list[tuple[ProxyThread, LogCapture]] = field(default_factory=list)

    def sidecar_for(self, name: str, peer: str | None = None) -> tuple[Workload, ProxyThread, int, LogCapture]:
        """Another client workload with its own sidecar pointing at the server sidecar."""
        w = Workload(name, self.tmp, self.ca)
        port = free_ports(1)[0]
        p = ProxyThread(w.config(outbound=[{"listenPort": port, "address": f"127.0.0.1:{self.inbound_port}",
                                            "peer": peer or self.server.spiffe_id}]), name)
        cap = LogCapture(f"meshtls.proxy.{name}")
        p.start()
        self.extra.append((p, cap))
        return w, p, port, cap


@contextlib.contextmanager
def build_mesh(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Mesh]:
    app = TcpApp(echo)
    server = Workload("server", tmp_path, ca)
    client = Workload("client", tmp_path, ca)
    inbound_port, outbound_port = free_ports(2)
    allow = [client.spiffe_id, spiffe("client2"), spiffe("client3"), "spiffe://example.org/ns/load/*"]
    server_cfg = server.config(inbound=[{"port": inbound_port, "appPort": app.port, "allow": allow}])
    client_cfg = client.config(outbound=[{"listenPort": outbound_port, "address": f"127.0.0.1:{inbound_port}",
                                          "peer": server.spiffe_id}])
    server_log = LogCapture("meshtls.proxy.server")
    client_log = LogCapture("meshtls.proxy.client")
    sp = ProxyThread(server_cfg, "server").start()
    cp = ProxyThread(client_cfg, "client").start()
    m = Mesh(tmp_path, ca, server, client, sp, cp, app, inbound_port, outbound_port, server_log, client_log)
    try:
        yield m
    finally:
        for p, cap in m.extra:
            p.stop()
            cap.close()
        cp.stop()
        sp.stop()
        app.close()
        server_log.close()
        client_log.close()
