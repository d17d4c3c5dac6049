"""`meshtls-proxy`: the L4 mTLS sidecar.

inbound:  peer sidecar --TLS, client certificate required--> 0.0.0.0:port --plain--> 127.0.0.1:appPort
outbound: app --plain--> 127.0.0.1:listenPort --TLS, our certificate--> address (peer SPIFFE ID checked)

The data path is asyncio Protocols splicing two sockets: one shared 64 KiB receive buffer (recv_into), TLS done
with ssl.SSLObject over memory BIOs, so that close_notify is a *half*-close in both directions (asyncio's own SSL
transport tears the whole connection down on close_notify, which loses the response of a client that shut down its
write side). Bytes are never parsed: HTTP/2 and gRPC pass through untouched.

Identity and trust bundle are polled (`..data` symlink); a change builds new SSL contexts used by new handshakes
only, so open connections keep flowing through a rotation. Sessions resume between sidecars (TLS 1.3 tickets);
a new context generation drops them, so a CRL update also forces full handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509

from meshtls.pki.errors import PKIError
from meshtls.pki.issue import format_serial
from meshtls.pki.spiffe import matches_pattern
from meshtls.pki.verify import svid_spiffe_id
from meshtls.sidecar.admin import AdminServer, Gauges, Stats, render_metrics
from meshtls.sidecar.config import InboundRoute, OutboundRoute, SidecarConfig, load_sidecar_config
from meshtls.sidecar.tlsfiles import Reloader, TLSContexts

log = logging.getLogger("meshtls.proxy")

BIND_ENV = "MESHTLS_PROXY_BIND_ADDRESS"
ACCESS_LOG_ENV = "MESHTLS_PROXY_ACCESS_LOG"
LOG_LEVEL_ENV = "MESHTLS_PROXY_LOG_LEVEL"
TICKETS_ENV = "MESHTLS_PROXY_SESSION_TICKETS"
DEFAULT_BIND = "0.0.0.0"
APP_HOST = "127.0.0.1"

READ_CHUNK = 64 * 1024  # one recv_into per readable event; shared by all connections
TLS_RECORD = 16 * 1024 + 256
DECRYPT_BUFFER = READ_CHUNK + TLS_RECORD
WRITE_HIGH_WATER = 256 * 1024  # a peer's write buffer above this pauses reading on the other socket
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
PEER_CACHE_SIZE = 1024
EXIT_CONFIG = 2
EXIT_RUNTIME = 1

# OpenSSL X509_V_ERR_* codes a sidecar operator will want told apart.
_VERIFY_REASONS = {
    23: "revoked",
    10: "expired",
    9: "not_yet_valid",
    3: "crl_unavailable",
    11: "crl_unavailable",
    12: "crl_expired",
    8: "crl_unavailable",
}
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}


class NoIdentity(Exception):
    """No certificate has loaded yet: connections are refused before any handshake."""


def classify_tls_error(exc: BaseException) -> tuple[str, str]:
    """(metric reason, human detail) for a failed handshake or TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, "untrusted"), f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "handshake_timeout", f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", "the peer sent no client certificate"
        if reason in _NOT_TLS:
            return "not_tls", f"not a TLS client ({reason.lower()})"
        if "ALERT" in reason:
            return "peer_refused", f"the peer refused the handshake ({reason.lower()})"
        if reason == "UNSUPPORTED_PROTOCOL":
            return "tls_version", "the peer offers only TLS < 1.2"
        return "handshake_failed", reason.lower() or str(exc)
    if isinstance(exc, ConnectionError | EOFError):
        return "peer_closed", "the peer closed the connection during the handshake"
    return "handshake_failed", str(exc) or type(exc).__name__


def _fmt(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (not text or " " in text or '"' in text or "=" in text) else text


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _address(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = peername[0]
        return f"[{host}]:{peername[1]}" if ":" in str(host) else f"{host}:{peername[1]}"
    return "-"


@dataclass(frozen=True)
class PeerInfo:
    spiffe_id: str | None
    error: str | None
    not_after: float
    serial: str
    serial_number: int
    issuer: x509.Name


# --- the two halves of a spliced connection ------------------------------------------------------------------------


class _Side(asyncio.BufferedProtocol):
    """One socket of a spliced pair. Data it reads goes to `peer`; until the peer is attached it is held."""

    accepted = False  # this side came from one of our listeners (counts as a connection of `direction`)

    def __init__(self, proxy: Proxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.read_eof = False  # our socket said EOF
        self.write_eof = False  # we sent EOF on our socket
        self.closing = False  # we asked the transport to close or abort
        self.closed = False  # connection_lost was called
        self._pending: list[bytes] = []
        self._pending_eof = False

    # transport callbacks -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.proxy._sides.add(self)
        if self.accepted:
            self.proxy.stats.connections[self.direction] += 1
            self.proxy.stats.active[self.direction] += 1

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proxy._inview  # shared: every callback consumes it before returning

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy._sides.discard(self)
        if self.accepted:
            self.proxy.stats.active[self.direction] -= 1
        peer, self.peer = self.peer, None  # break the pair's reference cycle now, not at the next full GC
        self._pending = []
        if peer is not None and not peer.closed:
            if exc is None:
                peer.close()
            else:
                peer.abort()

    # used by the peer ----------------------------------------------------------------------------------------
    def send(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def gone(self) -> bool:
        return self.closing or self.closed

    def attach(self, peer: _Side) -> None:
        self.peer = peer
        pending, self._pending = self._pending, []
        for data in pending:
            peer.send(data)
        if self._pending_eof:
            peer.send_eof()
        if self.closed:  # we went away while the peer was being connected
            peer.close()

    # helpers -------------------------------------------------------------------------------------------------
    def _to_peer(self, data: memoryview) -> None:
        peer = self.peer
        if peer is not None:
            peer.send(data)
        else:
            self._pending.append(bytes(data))

    def _eof_to_peer(self) -> None:
        if self.peer is not None:
            self.peer.send_eof()
        else:
            self._pending_eof = True


class _Plain(_Side):
    """A plaintext TCP socket: the app (inbound) or the app's connection to our listener (outbound)."""

    def buffer_updated(self, nbytes: int) -> None:
        self._to_peer(self.proxy._inview[:nbytes])

    def eof_received(self) -> bool:
        self.read_eof = True
        self._eof_to_peer()
        return not self.write_eof

    def send(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.write_eof and not self.gone:
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.write_eof or self.closed or self.transport is None:
            return
        self.write_eof = True
        if self.read_eof:
            self.transport.close()
        else:
            self.transport.write_eof()


class _Tls(_Side):
    """A TLS socket, TLS done by an SSLObject over memory BIOs so that close_notify is a half-close."""

    server_side = False

    def __init__(self, proxy: Proxy, direction: str, contexts: TLSContexts | None,
                 server_hostname: str | None = None, session_key: str | None = None) -> None:
        super().__init__(proxy, direction)
        self.contexts = contexts
        self.server_hostname = server_hostname
        self.session_key = session_key
        self.handshake_done = False
        self._handshake_reported = False
        self._timer: asyncio.TimerHandle | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.peername = "-"
        self.info: PeerInfo | None = None  # the authorized peer, once the connection is spliced
        self.got_data = False  # anything at all came in before the handshake ended
        self.received = 0  # application bytes
        self._capture = False  # take this connection's session (ticket) for the next connection to resume
        self._tcp_eof = False  # TCP FIN sent after our close_notify: nothing more may be written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peername = _address(transport.get_extra_info("peername"))
        contexts = self.contexts
        if contexts is None:
            self._handshake_finished(NoIdentity("no certificate loaded yet"))
            return
        if self.server_side:
            ctx, session = contexts.server, None
        else:
            ctx, session = contexts.client, contexts.client_sessions.get(self.session_key or "")
        self.sslobj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=self.server_side,
                                   server_hostname=self.server_hostname, session=session)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
        if not self.server_side:
            self._handshake()

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self.proxy._inview[:nbytes])
        if not self.handshake_done:
            self.got_data = True
            self._handshake()
        elif not self.read_eof:
            self._read_app()

    def eof_received(self) -> bool:
        if not self.handshake_done:
            self._handshake_finished(ConnectionResetError("closed during the handshake"))
            return False
        if not self.read_eof:
            self._incoming.write_eof()
            self._read_app()
        return not self.write_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._handshake_reported:
            self._handshake_finished(exc or ConnectionResetError("closed during the handshake"))
        super().connection_lost(exc)

    # handshake -----------------------------------------------------------------------------------------------
    def _handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._flush()  # the alert tells the peer why
            self._handshake_finished(exc)
            return
        self.handshake_done = True
        self._flush()
        if (self.session_key is not None and not self.sslobj.session_reused and self.contexts is not None
                and self.session_key not in self.contexts.ticketless):
            # A full handshake: the cached session (if any) is stale. TLS 1.2 carries the ticket in the handshake;
            # a TLS 1.3 server sends it right after (our server sidecars always before any application data).
            if self.sslobj.version() == "TLSv1.2":
                self._capture_session()
            else:
                self._capture = True
        self._handshake_finished(None)
        if not self.gone and not self.read_eof:
            self._read_app()  # application data that came with the peer's Finished, a TLS 1.3 ticket

    def _handshake_timeout(self) -> None:
        if not self.handshake_done:
            self._handshake_finished(TimeoutError())

    def _handshake_finished(self, exc: BaseException | None) -> None:
        if self._handshake_reported:
            return
        self._handshake_reported = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        stats = self.proxy.stats
        if exc is None:
            stats.handshakes[(self.direction, "success")] += 1
            if self.sslobj is not None and self.sslobj.session_reused:
                stats.resumed[self.direction] += 1
        elif not isinstance(exc, NoIdentity):
            stats.handshakes[(self.direction, "failure")] += 1
        self.on_handshake(exc)

    def on_handshake(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    # data ----------------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self.closed and not self._tcp_eof:
            self.transport.write(self._outgoing.read())

    def _capture_session(self) -> None:
        # Once per full handshake at most: CPython 3.11's SSLObject.session getter leaks a copy of the session
        # (~6 KB) on every call, so it is never polled.
        self._capture = False
        if self.sslobj is None or self.contexts is None:
            return
        session = self.sslobj.session
        if session is not None and session.has_ticket:
            self.contexts.client_sessions[self.session_key or ""] = session
        else:  # an upstream without tickets (e.g. nginx by default): every further look would only leak
            self.contexts.ticketless.add(self.session_key or "")

    def _read_app(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        incoming = self._incoming
        had_input = incoming.pending > 0
        view = self.proxy._decview
        room = len(view)
        off = 0
        eof = False
        error: ssl.SSLError | None = None
        while True:
            try:
                n = cast(int, sslobj.read(room - off, view[off:]))  # into the buffer: a count
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLEOFError:  # TCP EOF without close_notify
                eof = True
                break
            except ssl.SSLError as exc:
                error = exc
                break
            if n == 0:
                eof = True
                break
            off += n
            if room - off < TLS_RECORD:
                self._deliver(view[:off])
                off = 0
            if not incoming.pending and not sslobj.pending():
                break
        if off:
            self._deliver(view[:off])
        if self._capture and had_input:
            self._capture_session()
        if error is not None:
            self._tls_error(error)
            return
        self._flush()  # e.g. a KeyUpdate answer
        if eof:
            self.read_eof = True
            if not self.server_side and not self.received:
                # The usual sign of a server sidecar refusing us after the TLS 1.3 handshake (allow-list).
                self.proxy.log.info("%s upstream closed before sending anything peer_addr=%s (is this workload "
                                    "on its allow-list?)", self.direction, self.peername)
            self._eof_to_peer()
            if self.write_eof:
                self.close()

    def _deliver(self, data: memoryview) -> None:
        self.received += len(data)
        self.proxy.stats.bytes_received[self.direction] += len(data)
        peer = self.peer
        if peer is not None:
            peer.send(bytes(data))  # a copy: the buffer is shared and transports may keep what they cannot send
        else:
            self._pending.append(bytes(data))

    def _tls_error(self, exc: ssl.SSLError) -> None:
        if isinstance(exc, ssl.SSLEOFError):  # writing after the peer's TCP EOF without close_notify
            reason, detail = "unclean_eof", "the peer closed TCP without close_notify"
        else:
            reason, detail = classify_tls_error(exc)
            if reason == "handshake_failed":
                reason = "tls_error"
        if reason == "peer_refused":
            self.proxy.stats.rejections[(self.direction, reason)] += 1
        self.proxy.log.log(logging.INFO if reason == "unclean_eof" else logging.WARNING,
                           "%s tls error peer_addr=%s reason=%s detail=%s", self.direction, self.peername, reason,
                           _fmt(detail))
        self.abort()
        if self.peer is not None:
            self.peer.abort()

    def send(self, data: bytes | memoryview) -> None:
        if self.write_eof or self.gone or self.sslobj is None:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            self._tls_error(exc)
            return
        self.proxy.stats.bytes_sent[self.direction] += len(data)
        assert self.transport is not None
        self.transport.write(self._outgoing.read())

    def send_eof(self) -> None:
        if self.write_eof or self.closed or self.transport is None or self.sslobj is None:
            return
        self.write_eof = True
        with contextlib.suppress(ssl.SSLError):  # WantRead: our close_notify is out, theirs not yet in
            self.sslobj.unwrap()
        self._flush()
        if self.read_eof:
            self.transport.close()
        else:
            self.transport.write_eof()
            self._tcp_eof = True

    def close(self) -> None:
        """Close the TLS way: close_notify (unless sent already), then the socket."""
        if self.handshake_done and not self.write_eof and not self.gone and self.sslobj is not None:
            self.write_eof = True
            with contextlib.suppress(ssl.SSLError):
                self.sslobj.unwrap()
            self._flush()
        super().close()

    def close_notify(self) -> None:
        """Close politely after refusing a peer: close_notify, then the socket."""
        self.close()

    def peer_info(self) -> PeerInfo | None:
        assert self.sslobj is not None
        der = self.sslobj.getpeercert(binary_form=True)
        return self.proxy.peer_info(der) if der else None


class _InboundTls(_Tls):
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
        info = self.peer_info()
        refusal = proxy.authorize(info, route.allow)
        if refusal is not None:
            proxy.reject(self.direction, refusal[0], route.port, self.peername, info, refusal[1])
            self.close_notify()
            return
        assert info is not None and self.transport is not None and self.sslobj is not None
        self.info = info
        if proxy.access_log:
            proxy.log.info("inbound accepted port=%d peer_addr=%s peer=%s serial=%s resumed=%s", route.port,
                           self.peername, info.spiffe_id, info.serial, "yes" if self.sslobj.session_reused else "no")
        self.transport.pause_reading()
        proxy.spawn(self._connect_app(), self)

    async def _connect_app(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, app = await asyncio.wait_for(
                loop.create_connection(lambda: _Plain(self.proxy, "inbound"), APP_HOST, self.route.app_port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            self.proxy.stats.upstream_errors["inbound"] += 1
            self.proxy.log.warning("inbound app unreachable port=%d app=%s:%d error=%s", self.route.port, APP_HOST,
                                   self.route.app_port, _fmt(_error_text(exc)))
            self.abort()
            return
        app.attach(self)
        self.attach(app)  # closes the app connection too if the peer already went away
        if not self.gone and self.transport is not None:
            self.transport.resume_reading()


class _OutboundTls(_Tls):
    def __init__(self, proxy: Proxy, contexts: TLSContexts, route: OutboundRoute, host: str) -> None:
        super().__init__(proxy, "outbound", contexts, server_hostname=host, session_key=route.address)
        self.route = route
        self.done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_handshake(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


class _OutboundPlain(_Plain):
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
        tls = _OutboundTls(proxy, contexts, route, host)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: tls, host, int(port)), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            proxy.stats.upstream_errors["outbound"] += 1
            proxy.log.warning("outbound upstream unreachable port=%d upstream=%s error=%s", route.listen_port,
                              route.address, _fmt(_error_text(exc)))
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
        if proxy.access_log:
            proxy.log.info("outbound connected port=%d upstream=%s peer=%s serial=%s resumed=%s", route.listen_port,
                           route.address, info.spiffe_id, info.serial, "yes" if tls.sslobj.session_reused else "no")
        if self.gone:
            tls.close_notify()
            return
        tls.attach(self)
        self.attach(tls)
        if self.transport is not None:
            self.transport.resume_reading()


# --- the proxy -----------------------------------------------------------------------------------------------------


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
        self._sides: set[_Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._peer_cache: dict[bytes, PeerInfo] = {}
        self._inbound_servers: list[asyncio.Server] = []
        self._outbound_servers: list[asyncio.Server] = []
        self._admin: AdminServer | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._failures_seen = 0
        self.started = False

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
        crl_numbers = ",".join(str(_crl_number(c)) for c in bundle.crls) or "-"
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
            if not isinstance(side, _Tls) or side.info is None or side.gone:
                continue
            info = side.info
            for crl in crls:
                if crl.issuer == info.issuer and \
                        crl.get_revoked_certificate_by_serial_number(info.serial_number) is not None:
                    self.stats.rejections[(side.direction, "revoked")] += 1
                    self.log.warning("%s connection cut peer_addr=%s peer=%s serial=%s reason=revoked detail=%s",
                                     side.direction, side.peername, info.spiffe_id, info.serial,
                                     _fmt("the certificate was revoked while the connection was open"))
                    side.abort()
                    if side.peer is not None:
                        side.peer.abort()
                    break

    def peer_info(self, der: bytes) -> PeerInfo:
        info = self._peer_cache.get(der)
        if info is None:
            cert = x509.load_der_x509_certificate(der)
            try:
                spiffe_id: str | None = str(svid_spiffe_id(cert))
                error = None
            except PKIError as exc:
                spiffe_id, error = None, exc.message
            info = PeerInfo(spiffe_id, error, cert.not_valid_after_utc.timestamp(), format_serial(cert.serial_number),
                            cert.serial_number, cert.issuer)
            if len(self._peer_cache) >= PEER_CACHE_SIZE:
                self._peer_cache.clear()
            self._peer_cache[der] = info
        return info

    def authorize(self, info: PeerInfo | None, allowed: tuple[str, ...]) -> tuple[str, str] | None:
        """None when the peer may pass, else (reason, detail)."""
        if info is None:
            return "no_certificate", "the peer presented no certificate"
        if info.spiffe_id is None:
            return "bad_svid", f"not an X509-SVID: {info.error}"
        if info.not_after <= self.clock().timestamp():
            # A resumed session skips verification: its certificate may have expired since.
            return "expired", f"certificate {info.serial} expired"
        if not any(matches_pattern(info.spiffe_id, p) for p in allowed):
            return "not_allowed", "not in the allow-list" if allowed else "the allow-list is empty"
        return None

    def reject(self, direction: str, reason: str, port: int, peer_addr: str, info: PeerInfo | None,
               detail: str, quiet: bool = False) -> None:
        self.stats.rejections[(direction, reason)] += 1
        peer = (info.spiffe_id or "-") if info else "-"
        serial = info.serial if info else "-"
        where = "peer_addr" if direction == "inbound" else "upstream"
        self.log.log(logging.DEBUG if quiet else logging.WARNING,
                "%s rejected port=%d %s=%s peer=%s serial=%s reason=%s detail=%s",
                direction, port, where, peer_addr, peer, serial, reason, _fmt(detail))

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
        return render_metrics(self.stats, self.gauges())

    # lifecycle -------------------------------------------------------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, None], *sides: _Side) -> None:
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
        if self.contexts is None:
            self.log.error("no usable identity yet (%s); listening anyway and refusing connections until it loads",
                      self.reloader.status.last_error)
        cfg = self.config
        for route in cfg.inbound:
            if not route.allow:
                self.log.warning("inbound port %d has an empty allow-list: every peer is refused", route.port)
            self._inbound_servers.append(await loop.create_server(
                functools.partial(_InboundTls, self, route), self.bind_address or None, route.port, backlog=1024))
        for out in cfg.outbound:
            self._outbound_servers.append(await loop.create_server(
                functools.partial(_OutboundPlain, self, out), APP_HOST, out.listen_port, backlog=1024))
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


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


# --- command line --------------------------------------------------------------------------------------------------


async def _serve(proxy: Proxy, drain_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    await proxy.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, proxy.request_stop)
    await proxy.wait_stopped()
    log.info("stop signal: draining for up to %gs", drain_seconds)
    await proxy.shutdown(drain_seconds)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshtls-proxy", description="meshtls mTLS sidecar (L4 proxy)")
    parser.add_argument("--config", required=True, help="the sidecar config (proxy.yaml) rendered by the operator")
    parser.add_argument("--bind", default=os.environ.get(BIND_ENV, DEFAULT_BIND),
                        help=f"address for inbound listeners (env {BIND_ENV}; default {DEFAULT_BIND}; "
                             "'' for every address of every family)")
    parser.add_argument("--session-tickets", type=int, choices=range(0, 5), metavar="N",
                        default=os.environ.get(TICKETS_ENV, "1"),  # a string default goes through type=int
                        help=f"TLS 1.3 session tickets per inbound handshake (env {TICKETS_ENV}; default 1; "
                             "0 disables resumption)")
    parser.add_argument("--drain-seconds", type=float, default=5.0,
                        help="on SIGTERM, how long open connections may finish (default 5)")
    parser.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    parser.add_argument("--no-access-log", action="store_true",
                        help=f"do not log each accepted connection (env {ACCESS_LOG_ENV}=0)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        print(f"meshtls-proxy: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_sidecar_config(text)
    except PKIError as exc:
        print(f"meshtls-proxy: invalid config {args.config}: {exc.field}: {_one_line(exc.message)}", file=sys.stderr)
        return EXIT_CONFIG
    except (AttributeError, TypeError, ValueError) as exc:  # shapes the schema parser does not name
        print(f"meshtls-proxy: invalid config {args.config}: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    access_log = not args.no_access_log and os.environ.get(ACCESS_LOG_ENV, "1") not in ("0", "false", "no")
    proxy = Proxy(config, bind_address=args.bind, access_log=access_log, session_tickets=args.session_tickets)
    try:
        asyncio.run(_serve(proxy, args.drain_seconds))
    except OSError as exc:
        print(f"meshtls-proxy: cannot listen: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
