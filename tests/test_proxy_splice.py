"""The splice's decrypt path hands the shared buffer to the peer's transport without a copy per chunk, and takes a
new buffer when a transport keeps the old one (as Python >= 3.12's socket transports keep the caller's buffer
when the socket cannot take everything at once)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from testsupport.proxymesh import issue

from meshtls.dataplane.config import SidecarConfig
from meshtls.pki import CertificateAuthority
from meshtls.proxy.server import Proxy
from meshtls.proxy.splice import READ_CHUNK, Plain, Tls

WALL_CLOCK = True  # OpenSSL judges the certificate against the real time (see conftest)


class Transport:
    """A socket transport that either sends everything at once or, backed up, keeps what it is given by
    reference (Python >= 3.12 keeps a view of the caller's buffer)."""

    def __init__(self) -> None:
        self.backed_up = False
        self.sent = bytearray()
        self.kept: list[bytes | memoryview] = []
        self.kinds: set[type] = set()

    def write(self, data: bytes | memoryview) -> None:
        self.kinds.add(type(data))
        if self.backed_up:
            self.kept.append(data)
        else:
            self.sent += data

    def get_write_buffer_size(self) -> int:
        return sum(len(k) for k in self.kept)


def _pair(ca: CertificateAuthority, tmp: Path) -> tuple[Proxy, Tls, Transport, ssl.SSLObject, ssl.MemoryBIO,
                                                        ssl.MemoryBIO]:
    cert = issue(ca, "server")
    (tmp / "tls.crt").write_bytes(cert.cert_chain_pem)
    (tmp / "tls.key").write_bytes(cert.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    proxy = Proxy(SidecarConfig(spiffe_id="spiffe://splice.test/ns/a/sa/b"))
    tls = Tls(proxy, "inbound", None)
    tls.sslobj = server_ctx.wrap_bio(tls._incoming, tls._outgoing, server_side=True)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out)
    for _ in range(10):  # the handshake, over the two pairs of memory BIOs
        for obj in (client, tls.sslobj):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        tls._incoming.write(c_out.read())
        c_in.write(tls._outgoing.read())
    client.do_handshake()
    tls.handshake_done = True
    transport = Transport()
    app = Plain(proxy, "inbound")
    app.transport = transport  # type: ignore[assignment]
    tls.peer = app
    return proxy, tls, transport, client, c_out, c_in


def _send(tls: Tls, client: ssl.SSLObject, c_out: ssl.MemoryBIO, data: bytes) -> None:
    client.write(data)
    tls._incoming.write(c_out.read())
    tls._read_app()


@pytest.mark.parametrize("size", [100, READ_CHUNK - 1, 3 * READ_CHUNK + 12345])
def test_decrypted_bytes_reach_the_peer_as_views_of_the_shared_buffer(ca: CertificateAuthority, tmp_path: Path,
                                                                      size: int) -> None:
    proxy, tls, transport, client, c_out, _ = _pair(ca, tmp_path)
    buffer = proxy._decview
    payload = os.urandom(size)
    _send(tls, client, c_out, payload)
    assert bytes(transport.sent) == payload
    assert transport.kinds == {memoryview}  # no bytes() copy per chunk
    assert proxy._decview is buffer  # everything went out: the buffer is reused


@pytest.mark.parametrize("size", [100, 3 * READ_CHUNK + 12345])
def test_a_backed_up_peer_keeps_its_bytes_while_later_ones_are_decrypted(ca: CertificateAuthority, tmp_path: Path,
                                                                         size: int) -> None:
    proxy, tls, transport, client, c_out, _ = _pair(ca, tmp_path)
    transport.backed_up = True
    buffer = proxy._decview
    first, second = os.urandom(size), os.urandom(size)
    _send(tls, client, c_out, first)
    assert proxy._decview is not buffer  # the transport holds the old one: decrypt into a new one
    _send(tls, client, c_out, second)  # decrypted while the transport still holds `first`
    assert b"".join(bytes(k) for k in transport.kept) == first + second
    transport.backed_up = False
    third = os.urandom(1000)
    _send(tls, client, c_out, third)
    assert bytes(transport.sent) == third
