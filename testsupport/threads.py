"""Threads that run beside a test (load, observers) for as long as a `with` block does."""

from __future__ import annotations

import threading
from typing import Self


class BackgroundThreads:
    """Starts `self._threads` on entering the block; on leaving it sets `self._stop` and joins each thread."""

    join_timeout = 10.0  # seconds per thread: a stuck one must not hang the suite

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.join_timeout)
