"""Per route, how a connection is set up: inbound (handshake, authorize the peer, connect to the app) and outbound
(connect upstream, handshake, check the peer is the route's)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshtls.dataplane.config import InboundRoute, OutboundRoute
from meshtls.proxy.errors import NoIdentity, classify_tls_error, error_text, log_value
from meshtls.proxy.reloader import TLSContexts
from meshtls.proxy.splice import Plain, Tls
from meshtls.proxy.tls_group import negotiated_group

if TYPE_CHECKING:
    from meshtls.proxy.server import Proxy

APP_HOST = "127.0.0.1"
CONNECT_TIMEOUT = 10.0


class InboundTls(Tls):
    server_side = True
    accepted = True

    def __init__(self, proxy: Proxy, route: InboundRoute) -> None:
        super().__init__(proxy, "inbound", proxy.contexts)
        self.route = route

    def on_handshake(self, exc: BaseException | None) -> None:
        proxy, route = self.proxy, self.route
        if exc is not None:
            if isinstance(exc, NoIdentity):
                reason, detail = "no_identity", str(exc)
            else:
                reason, detail = classify_tls_error(exc)
            # A connection that sent nothing at all (a TCP probe, a port scan) is counted but not worth a warning.
            quiet = reason == "peer_closed" and not self.got_data
            proxy.reject(self.direction, reason, route.port, self.peername, None, detail, quiet=quiet)
            self.close()
            return
        if self.sslobj is not None:
            proxy.stats.groups[(self.direction, negotiated_group(self.sslobj))] += 1
        info = self.peer_info()
        refusal = proxy.authorize(info, route.allow)
        if refusal is not None:
            proxy.reject(self.direction, refusal[0], route.port, self.peername, info, refusal[1])
            self.close_notify()
            return
        assert info is not None and self.transport is not None and self.sslobj is not None
        self.info = info
        level = proxy.access_log_level("inbound", info.serial) if proxy.access_log else logging.NOTSET
        if level and proxy.log.isEnabledFor(level):  # refusals are logged at WARNING, always
            proxy.log.log(level, "inbound accepted port=%d peer_addr=%s peer=%s serial=%s resumed=%s", route.port,
                          self.peername, info.spiffe_id, info.serial, "yes" if self.sslobj.session_reused else "no")
        self.transport.pause_reading()
        proxy.spawn(self._connect_app(), self)

    async def _connect_app(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, app = await asyncio.wait_for(
                loop.create_connection(lambda: Plain(self.proxy, "inbound"), APP_HOST, self.route.app_port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            self.proxy.stats.upstream_errors["inbound"] += 1
            self.proxy.log.warning("inbound app unreachable port=%d app=%s:%d error=%s", self.route.port, APP_HOST,
                                   self.route.app_port, log_value(error_text(exc)))
            self.abort()
            return
        app.attach(self)
        self.attach(app)  # closes the app connection too if the peer already went away
        if not self.gone and self.transport is not None:
            self.transport.resume_reading()


class OutboundTls(Tls):
    def __init__(self, proxy: Proxy, contexts: TLSContexts, route: OutboundRoute, host: str) -> None:
        super().__init__(proxy, "outbound", contexts, server_hostname=host, session_key=route.address)
        self.route = route
        self.done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_handshake(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


class OutboundPlain(Plain):
    accepted = True

    def __init__(self, proxy: Proxy, route: OutboundRoute) -> None:
        super().__init__(proxy, "outbound")
        self.route = route

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.proxy.spawn(self._connect_upstream(), self)

    async def _connect_upstream(self) -> None:
        proxy, route = self.proxy, self.route
        contexts = proxy.contexts
        if contexts is None:
            proxy.reject("outbound", "no_identity", route.listen_port, route.address, None, "no certificate loaded")
            self.abort()
            return
        host, _, port = route.address.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        tls = OutboundTls(proxy, contexts, route, host)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: tls, host, int(port)), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            proxy.stats.upstream_errors["outbound"] += 1
            proxy.log.warning("outbound upstream unreachable port=%d upstream=%s error=%s", route.listen_port,
                              route.address, log_value(error_text(exc)))
            self.abort()
            return
        failure = await tls.done
        if failure is None and tls.gone:  # refused right after the handshake (logged by the TLS side)
            self.abort()
            return
        if failure is not None:
            reason, detail = classify_tls_error(failure)
            proxy.reject("outbound", reason, route.listen_port, route.address, None, detail)
            tls.close()
            self.abort()
            return
        if tls.sslobj is not None:
            proxy.stats.groups[("outbound", negotiated_group(tls.sslobj))] += 1
        info = tls.peer_info()
        why = proxy.authorize(info, (route.peer,))
        if why is not None:
            reason = "wrong_peer" if why[0] == "not_allowed" else why[0]
            proxy.reject("outbound", reason, route.listen_port, route.address, info,
                         f"expected {route.peer}" if reason == "wrong_peer" else why[1])
            tls.close_notify()
            self.abort()
            return
        assert info is not None and tls.sslobj is not None
        tls.info = info
        level = proxy.access_log_level("outbound", info.serial) if proxy.access_log else logging.NOTSET
        if level and proxy.log.isEnabledFor(level):
            proxy.log.log(level, "outbound connected port=%d upstream=%s peer=%s serial=%s resumed=%s",
                          route.listen_port, route.address, info.spiffe_id, info.serial,
                          "yes" if tls.sslobj.session_reused else "no")
        if self.gone:
            tls.close_notify()
            return
        tls.attach(self)
        self.attach(tls)
        if self.transport is not None:
            self.transport.resume_reading()
