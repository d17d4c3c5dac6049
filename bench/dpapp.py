"""The data-plane bench's backend app, its own process: `python -m bench.dpapp PORT`.

The first byte of a connection picks the mode: `E` echoes every following byte back; `S` swallows everything until
EOF, then answers the byte count (8 bytes, big-endian) and closes.
"""

from __future__ import annotations

import asyncio
import sys


class App(asyncio.Protocol):
    def __init__(self) -> None:
        self.mode = b""
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.mode:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"E":
            if data and self.transport is not None:
                self.transport.write(data)
        else:
            self.count += len(data)

    def eof_received(self) -> bool:
        if self.mode == b"S" and self.transport is not None:
            self.transport.write(self.count.to_bytes(8, "big"))
        return False


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(App, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
