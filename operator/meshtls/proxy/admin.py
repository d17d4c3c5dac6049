"""The sidecar's admin endpoint: /healthz, /readyz and /metrics (Prometheus text format 0.0.4).

The data path only bumps plain integers (no locks, no label lookups per chunk); the exposition is rendered from them
at scrape time. Rendering by hand keeps the proxy's memory small: prometheus_client's exposition module pulls in
http.server, wsgiref and threading machinery the sidecar never uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "meshtls_proxy_"


@dataclass
class Stats:
    """Counters the data path bumps. Keys are label tuples; only known label values are ever used."""

    handshakes: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (direction, result)
    resumed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # direction
    # (direction, key-exchange group as OpenSSL names it: X25519MLKEM768, x25519, ..., unknown)
    groups: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    rejections: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (direction, reason)
    connections: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # direction
    active: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # direction
    bytes_received: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # from the mesh peer
    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # to the mesh peer
    upstream_errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # direction
    reloads: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # result


@dataclass(frozen=True)
class Gauges:
    """Values read from the proxy's state at scrape time."""

    ready: bool
    certificate_not_after: float | None
    certificate_not_before: float | None
    serial: str | None
    spiffe_id: str | None
    bundle_roots: int
    crl_count: int
    crl_next_update: float | None
    generation: int


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]],
               suffix: str = "") -> None:
        full = PREFIX + name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{full}{suffix}{{{text}}} {_number(value)}" if text else
                              f"{full}{suffix} {_number(value)}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


DIRECTIONS = ("inbound", "outbound")


def render_metrics(stats: Stats, gauges: Gauges) -> bytes:
    w = _Writer()
    w.family("handshakes", "counter", "TLS handshakes by direction and result (success, failure).",
             [({"direction": d, "result": r}, v) for (d, r), v in sorted(stats.handshakes.items())], "_total")
    w.family("resumed_handshakes", "counter", "Successful handshakes that resumed a TLS session.",
             [({"direction": d}, stats.resumed[d]) for d in DIRECTIONS], "_total")
    w.family("tls_groups", "counter", "Successful handshakes by direction and the key-exchange group negotiated "
             "(X25519MLKEM768: hybrid post-quantum; x25519 or secp256r1: the classical fallback).",
             [({"direction": d, "group": g}, v) for (d, g), v in sorted(stats.groups.items())], "_total")
    w.family("rejections", "counter", "Connections refused, by direction and reason.",
             [({"direction": d, "reason": r}, v) for (d, r), v in sorted(stats.rejections.items())], "_total")
    w.family("connections", "counter", "Connections accepted by the sidecar's listeners.",
             [({"direction": d}, stats.connections[d]) for d in DIRECTIONS], "_total")
    w.family("active_connections", "gauge", "Connections open now.",
             [({"direction": d}, stats.active[d]) for d in DIRECTIONS])
    w.family("received_bytes", "counter", "Application bytes received from mesh peers over TLS.",
             [({"direction": d}, stats.bytes_received[d]) for d in DIRECTIONS], "_total")
    w.family("sent_bytes", "counter", "Application bytes sent to mesh peers over TLS.",
             [({"direction": d}, stats.bytes_sent[d]) for d in DIRECTIONS], "_total")
    w.family("upstream_errors", "counter", "Connections dropped because the app (inbound) or upstream (outbound) "
             "could not be reached.", [({"direction": d}, stats.upstream_errors[d]) for d in DIRECTIONS], "_total")
    w.family("reloads", "counter", "Reloads of the identity and trust bundle, by result.",
             [({"result": r}, stats.reloads[r]) for r in ("success", "failure")], "_total")
    w.family("ready", "gauge", "1 when a valid, unexpired certificate is loaded.", [({}, int(gauges.ready))])
    if gauges.certificate_not_after is not None:
        w.family("certificate_expiry_timestamp_seconds", "gauge", "notAfter of the loaded certificate (Unix time).",
                 [({}, gauges.certificate_not_after)])
        w.family("certificate_not_before_timestamp_seconds", "gauge",
                 "notBefore of the loaded certificate (Unix time).", [({}, gauges.certificate_not_before or 0.0)])
        w.family("certificate_info", "gauge", "The loaded certificate.",
                 [({"serial": gauges.serial or "", "spiffe_id": gauges.spiffe_id or ""}, 1)])
    w.family("trust_bundle_roots", "gauge", "Root certificates in the trust bundle.", [({}, gauges.bundle_roots)])
    w.family("crls", "gauge", "CRLs loaded from the trust bundle (0: revocation not checked).",
             [({}, gauges.crl_count)])
    if gauges.crl_next_update is not None:
        w.family("crl_next_update_timestamp_seconds", "gauge",
                 "Earliest nextUpdate of the loaded CRLs (Unix time); past it OpenSSL refuses peers.",
                 [({}, gauges.crl_next_update)])
    w.family("tls_generation", "gauge", "TLS context generations built since start (1 = initial load).",
             [({}, gauges.generation)])
    return w.text()


Probe = Callable[[], tuple[bool, str]]


class AdminServer:
    """A tiny HTTP/1.1 server (one request per connection) for probes and scrapes."""

    def __init__(self, address: str, port: int, health: Probe, ready: Probe, metrics: Callable[[], bytes]) -> None:
        self.address = address
        self.port = port
        self._health = health
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address, self.port, limit=16 * 1024)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while True:  # headers are not needed; read them to be polite
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = path.split("?", 1)[0]
            status, ctype, body = self._route(method, path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE, self._metrics()
        if path in ("/healthz", "/readyz"):
            ok, reason = (self._health if path == "/healthz" else self._ready)()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (reason + "\n").encode()
        return "404 Not Found", "text/plain", b"try /healthz, /readyz or /metrics\n"
