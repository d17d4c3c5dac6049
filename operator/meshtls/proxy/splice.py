"""The two halves of a spliced connection: asyncio BufferedProtocols reading into one shared buffer, TLS done with
ssl.SSLObject over memory BIOs so that close_notify is a *half*-close in both directions (asyncio's own SSL transport
tears the whole connection down on close_notify, which loses the response of a client that shut down its write side).
Bytes are never parsed: HTTP/2 and gRPC pass through untouched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING, cast

from meshtls.proxy.authz import PeerInfo
from meshtls.proxy.errors import HANDSHAKE_TIMEOUT, NoIdentity, classify_tls_error, log_value, peer_address
from meshtls.proxy.reloader import TLSContexts

if TYPE_CHECKING:
    from meshtls.proxy.server import Proxy

# One recv_into per readable event, into one buffer shared by all connections. 256 KiB measured 0.85-0.93x the CPU per
# GiB but +1-3 MB peak RSS (larger transient TLS writes): over the 40 MB sidecar goal (docs/benchmarks.md).
READ_CHUNK = 64 * 1024
TLS_RECORD = 16 * 1024 + 256
DECRYPT_BUFFER = READ_CHUNK + TLS_RECORD
WRITE_HIGH_WATER = 256 * 1024  # a peer's write buffer above this pauses reading on the other socket


class Side(asyncio.BufferedProtocol):
    """One socket of a spliced pair. Data it reads goes to `peer`; until the peer is attached it is held."""

    accepted = False  # this side came from one of our listeners (counts as a connection of `direction`)

    def __init__(self, proxy: Proxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
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

    def attach(self, peer: Side) -> None:
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


class Plain(Side):
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


class Tls(Side):
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
        self.peername = peer_address(transport.get_extra_info("peername"))
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
                view = self.proxy._decview  # a new buffer if the peer's transport kept the old one
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
        """Hand decrypted bytes (a view of the shared decrypt buffer) to the peer without copying them."""
        self.received += len(data)
        self.proxy.stats.bytes_received[self.direction] += len(data)
        peer = self.peer
        if peer is None:
            self._pending.append(bytes(data))
            return
        peer.send(data)
        transport = peer.transport
        if transport is not None and transport.get_write_buffer_size():
            # Not all of it went out: the transport may hold the view itself (Python >= 3.12 keeps the caller's
            # buffer), so that buffer is the transport's now and later reads decrypt into a new one.
            self.proxy.renew_decrypt_buffer()

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
                           log_value(detail))
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
