"""One sidecar: its listeners, the current TLS generation, the reload loop, revocation cuts and the admin endpoint."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography import x509

from meshtls.dataplane.config import SidecarConfig
from meshtls.pki.crl import crl_number
from meshtls.proxy.admin import AdminServer, Gauges, Stats, render_metrics
from meshtls.proxy.authz import PeerCache, PeerInfo, authorize
from meshtls.proxy.errors import log_value
from meshtls.proxy.reloader import Reloader, TLSContexts
from meshtls.proxy.routes import APP_HOST, InboundTls, OutboundPlain
from meshtls.proxy.splice import DECRYPT_BUFFER, READ_CHUNK, Side, Tls

log = logging.getLogger("meshtls.proxy")

DEFAULT_BIND = "0.0.0.0"
ACCESS_LOG_MEMORY = 4096  # peer certificates remembered as logged at INFO


class Proxy:
    """Listeners, the current TLS generation, the reload loop and the admin endpoint of one sidecar."""

    def __init__(self, config: SidecarConfig, bind_address: str = DEFAULT_BIND, access_log: bool = True,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC), name: str | None = None,
                 session_tickets: int = 1) -> None:
        self.log = logging.getLogger(f"{log.name}.{name}") if name else log
        self.config = config
        self.bind_address = bind_address
        self.access_log = access_log
        self.clock = clock
        self.stats = Stats()
        self.reloader = Reloader(config.identity_dir, config.bundle_dir, config.spiffe_id, clock, self.log,
                                 session_tickets)
        self.contexts: TLSContexts | None = None
        self._inview = memoryview(bytearray(READ_CHUNK))
        self._decview = memoryview(bytearray(DECRYPT_BUFFER))
        self._sides: set[Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._peer_cache = PeerCache()
        self._inbound_servers: list[asyncio.Server] = []
        self._outbound_servers: list[asyncio.Server] = []
        self._admin: AdminServer | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._failures_seen = 0
        self._access_logged: set[tuple[str, str]] = set()
        self.started = False
        # what else the pod serves from the same files (the Workload API): told after every reload tick, scraped too
        self.observers: list[Callable[[], object]] = []
        self.metric_sources: list[Callable[[], bytes]] = []

    def access_log_level(self, direction: str, serial: str) -> int:
        """INFO for the first connection of a peer certificate in a direction, DEBUG for the rest: a log line per
        connection at INFO cost 6-11 % of the proxy's CPU (docs/benchmarks.md), one per certificate shows who
        connects (and that a rotated certificate arrived)."""
        key = (direction, serial)
        if key in self._access_logged:
            return logging.DEBUG
        if len(self._access_logged) >= ACCESS_LOG_MEMORY:
            self._access_logged.clear()  # bounded: at worst a peer is logged at INFO once more
        self._access_logged.add(key)
        return logging.INFO

    def renew_decrypt_buffer(self) -> None:
        """A fresh shared decrypt buffer: a transport still holds (a view of) the current one."""
        self._decview = memoryview(bytearray(DECRYPT_BUFFER))

    # TLS material ---------------------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Check the volumes once; swap in a new generation if they changed and are usable."""
        new = self.reloader.check()
        failures = self.reloader.status.failures
        if failures != self._failures_seen:
            self.stats.reloads["failure"] += failures - self._failures_seen
            self._failures_seen = failures
        if new is None:
            return False
        old, self.contexts = self.contexts, new
        self.stats.reloads["success"] += 1
        ident, bundle = new.identity, new.bundle
        crl_numbers = ",".join(str(crl_number(c)) for c in bundle.crls) or "-"
        self.log.info("%s serial=%s spiffe_id=%s not_after=%s roots=%d crls=%d crl_numbers=%s generation=%d",
                      "loaded" if old is None else "reloaded", ident.serial, ident.spiffe_id,
                      ident.not_after.isoformat(), len(bundle.roots), len(bundle.crls), crl_numbers, new.generation)
        if old is not None and old.bundle.crl_pem != bundle.crl_pem:
            self._cut_revoked(bundle.crls)
        return True

    def _cut_revoked(self, crls: tuple[x509.CertificateRevocationList, ...]) -> None:
        """A certificate revoked now must not keep a connection it opened before: close those connections.

        (Connections of a merely superseded certificate, after a rotation, keep flowing.)
        """
        for side in list(self._sides):
            if not isinstance(side, Tls) or side.info is None or side.gone:
                continue
            info = side.info
            for crl in crls:
                if crl.issuer == info.issuer and \
                        crl.get_revoked_certificate_by_serial_number(info.serial_number) is not None:
                    self.stats.rejections[(side.direction, "revoked")] += 1
                    self.log.warning("%s connection cut peer_addr=%s peer=%s serial=%s reason=revoked detail=%s",
                                     side.direction, side.peername, info.spiffe_id, info.serial,
                                     log_value("the certificate was revoked while the connection was open"))
                    side.abort()
                    if side.peer is not None:
                        side.peer.abort()
                    break

    def peer_info(self, der: bytes) -> PeerInfo:
        return self._peer_cache.get(der)

    def authorize(self, info: PeerInfo | None, allowed: tuple[str, ...]) -> tuple[str, str] | None:
        """None when the peer may pass, else (reason, detail)."""
        return authorize(info, allowed, self.clock().timestamp())

    def reject(self, direction: str, reason: str, port: int, peer_addr: str, info: PeerInfo | None,
               detail: str, quiet: bool = False) -> None:
        self.stats.rejections[(direction, reason)] += 1
        peer = (info.spiffe_id or "-") if info else "-"
        serial = info.serial if info else "-"
        where = "peer_addr" if direction == "inbound" else "upstream"
        self.log.log(logging.DEBUG if quiet else logging.WARNING,
                "%s rejected port=%d %s=%s peer=%s serial=%s reason=%s detail=%s",
                direction, port, where, peer_addr, peer, serial, reason, log_value(detail))

    # probes ----------------------------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        return (self.started, "running" if self.started else "starting")

    def ready(self) -> tuple[bool, str]:
        contexts = self.contexts
        if contexts is None:
            return False, f"no certificate loaded: {self.reloader.status.last_error or 'not read yet'}"
        ident = contexts.identity
        if ident.not_after <= self.clock():
            return False, f"certificate {ident.serial} expired at {ident.not_after.isoformat()}"
        return True, f"serving {ident.spiffe_id} serial {ident.serial} until {ident.not_after.isoformat()}"

    def gauges(self) -> Gauges:
        c = self.contexts
        ident = c.identity if c else None
        bundle = c.bundle if c else None
        next_update = bundle.crl_next_update if bundle else None
        return Gauges(
            ready=self.ready()[0],
            certificate_not_after=ident.not_after.timestamp() if ident else None,
            certificate_not_before=ident.not_before.timestamp() if ident else None,
            serial=ident.serial if ident else None,
            spiffe_id=ident.spiffe_id if ident else None,
            bundle_roots=len(bundle.roots) if bundle else 0,
            crl_count=len(bundle.crls) if bundle else 0,
            crl_next_update=next_update.timestamp() if next_update else None,
            generation=c.generation if c else 0,
        )

    def metrics(self) -> bytes:
        return render_metrics(self.stats, self.gauges()) + b"".join(source() for source in self.metric_sources)

    def _tell_observers(self) -> None:
        for observer in self.observers:
            try:
                observer()
            except Exception:  # one consumer's bug must not stop the reloads
                self.log.exception("reload observer failed")

    # lifecycle -------------------------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, None], *sides: Side) -> None:
        """Run a connection's setup; if it crashes, say so and cut that connection (never the proxy)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("connection setup failed", exc_info=t.exception())
                for side in sides:
                    side.abort()

        task.add_done_callback(done)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.reload()
        self._tell_observers()
        if self.contexts is None:
            self.log.error("no usable identity yet (%s); listening anyway and refusing connections until it loads",
                      self.reloader.status.last_error)
        cfg = self.config
        for route in cfg.inbound:
            if not route.allow:
                self.log.warning("inbound port %d has an empty allow-list: every peer is refused", route.port)
            self._inbound_servers.append(await loop.create_server(
                functools.partial(InboundTls, self, route), self.bind_address or None, route.port, backlog=1024))
        for out in cfg.outbound:
            self._outbound_servers.append(await loop.create_server(
                functools.partial(OutboundPlain, self, out), APP_HOST, out.listen_port, backlog=1024))
        self._admin = AdminServer(cfg.admin_address, cfg.admin_port, self.healthy, self.ready, self.metrics)
        await self._admin.start()
        self._reload_task = loop.create_task(self._reload_loop())
        self.started = True
        self.log.info("meshtls-proxy started spiffe_id=%s inbound=%s outbound=%s admin=%s:%d bind=%s reload=%gs",
                 cfg.spiffe_id, ",".join(f"{r.port}->{r.app_port}" for r in cfg.inbound) or "-",
                 ",".join(f"{r.listen_port}->{r.address}" for r in cfg.outbound) or "-",
                 cfg.admin_address, cfg.admin_port, self.bind_address, cfg.reload_interval.total_seconds())

    async def _reload_loop(self) -> None:
        interval = self.config.reload_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload()
            except Exception:  # never let a surprise stop the reloads
                self.log.exception("reload crashed; will retry")
            self._tell_observers()

    def request_stop(self) -> None:
        if self._stop is not None:
            if self._stop.is_set():
                self.log.info("second stop signal: closing now")
                for side in list(self._sides):
                    side.abort()
            self._stop.set()

    async def wait_stopped(self) -> None:
        assert self._stop is not None
        await self._stop.wait()

    async def shutdown(self, drain_seconds: float = 5.0) -> None:
        """Stop accepting inbound, let open connections finish (outbound keeps working meanwhile), then close."""
        for server in self._inbound_servers:
            server.close()
        deadline = time.monotonic() + drain_seconds
        while self._sides and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for server in self._outbound_servers:
            server.close()
        if self._admin is not None:
            self._admin.close()
        if self._reload_task is not None:
            self._reload_task.cancel()
        left = len(self._sides)
        for side in list(self._sides):
            side.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        self.started = False
        self.log.info("meshtls-proxy stopped (%d connections cut after the drain)", left)
