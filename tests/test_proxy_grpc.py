"""gRPC (HTTP/2, plaintext to the app) through two sidecars; a bidirectional stream survives rotations."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from testsupport.proxymesh import LogCapture, ProxyThread, Workload, free_ports, issue

from meshtls.pki import CertificateAuthority

WALL_CLOCK = True  # OpenSSL and the sidecars judge certificates against the real time (see conftest)

pytestmark = pytest.mark.timeout(60)

SERVICE = "meshtls.test.Echo"


def _chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for message in requests:
        yield b"echo:" + message


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"unary:" + request


def _grpc_server() -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_grpc_unary_and_bidi_stream_across_rotations(tmp_path: Path, ca: CertificateAuthority) -> None:
    app, app_port = _grpc_server()
    server, client = Workload("server", tmp_path, ca), Workload("client", tmp_path, ca)
    inbound, outbound = free_ports(2)
    slog, clog = LogCapture("meshtls.proxy.grpc-server"), LogCapture("meshtls.proxy.grpc-client")
    sp = ProxyThread(server.config(inbound=[{"port": inbound, "appPort": app_port, "allow": [client.spiffe_id]}]),
                     "grpc-server").start()
    cp = ProxyThread(client.config(outbound=[{"listenPort": outbound, "address": f"127.0.0.1:{inbound}",
                                              "peer": server.spiffe_id}]), "grpc-client").start()
    channel = grpc.insecure_channel(f"127.0.0.1:{outbound}")
    requests: queue.Queue[bytes | None] = queue.Queue()

    def request_iter() -> Iterator[bytes]:
        while (item := requests.get()) is not None:
            yield item

    try:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hello", timeout=10) == b"unary:hello"
        chat = channel.stream_stream(f"/{SERVICE}/Chat")
        responses = chat(request_iter(), timeout=30)
        sent = 0

        def exchange(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                message = f"m{sent}".encode() * (1 + sent % 50)
                requests.put(message)
                assert next(responses) == b"echo:" + message
                sent += 1

        exchange(20)
        for round_ in range(3):
            new_server, new_client = server.rotate(), client.rotate()
            slog.wait_for("reloaded", f"serial={new_server.serial_hex}")
            clog.wait_for("reloaded", f"serial={new_client.serial_hex}")
            if round_ == 1:  # a CRL update that does not concern this stream does not disturb it either
                server.revoke(issue(ca, "someone-else"), number=3)
                slog.wait_for("reloaded", "crl_numbers=3")
            exchange(50)  # the stream opened before the rotation keeps flowing
        # a fresh channel (new TCP connection, new handshake) sees the new certificates
        fresh = grpc.insecure_channel(f"127.0.0.1:{outbound}", options=[("grpc.use_local_subchannel_pool", 1)])
        assert fresh.unary_unary(f"/{SERVICE}/Unary")(b"after", timeout=10) == b"unary:after"
        fresh.close()
        clog.wait_for("outbound connected", f"serial={new_server.serial_hex}")
        slog.wait_for("inbound accepted", f"serial={new_client.serial_hex}")
        requests.put(None)
        assert list(responses) == []
        assert sent == 170
        # the original HTTP/2 connection carried the whole stream: one handshake per channel
        assert len(slog.matching("inbound accepted")) == 2
    finally:
        requests.put(None)
        channel.close()
        cp.stop()
        sp.stop()
        app.stop(0)
        slog.close()
        clog.close()
        time.sleep(0)
