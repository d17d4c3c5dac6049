"""One timer for all identities: a heap of renewal times, woken by the earliest.

kopf timers and daemons would hold an asyncio task per object and add finalizers; a heap holds a tuple per object.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
from collections.abc import Awaitable, Callable

from meshtls.policy.clock import Clock

Key = tuple[str, str]  # (namespace, name)
log = logging.getLogger("meshtls.scheduler")


class RenewalScheduler:
    def __init__(self, clock: Clock, work: Callable[[Key], Awaitable[None]], concurrency: int = 8) -> None:
        self._clock = clock
        self._work = work
        self._heap: list[tuple[dt.datetime, Key]] = []
        self._due: dict[Key, dt.datetime] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, key: Key, when: dt.datetime) -> None:
        """(Re)schedule `key`; the latest call wins."""
        self._due[key] = when
        heapq.heappush(self._heap, (when, key))
        if self._heap[0][1] == key:
            self._wake.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)

    def due_at(self, key: Key) -> dt.datetime | None:
        return self._due.get(key)

    def __len__(self) -> int:
        return len(self._due)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                when, key = heapq.heappop(self._heap)
                if self._due.get(key) != when:
                    continue  # superseded by a later schedule() or forgotten
                del self._due[key]
                await self._slots.acquire()
                task = asyncio.create_task(self._run_one(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            timeout = (self._heap[0][0] - now).total_seconds() if self._heap else 3600.0
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))
            except TimeoutError:
                pass

    async def _run_one(self, key: Key) -> None:
        try:
            await self._work(key)
        except Exception:
            log.exception("renewal of %s/%s failed; retrying in 10 s", *key)
            self.schedule(key, self._clock.now() + dt.timedelta(seconds=10))
        finally:
            self._slots.release()
