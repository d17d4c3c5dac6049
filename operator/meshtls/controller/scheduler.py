"""One timer for all identities and trust domains: a heap of due times, woken by the earliest.

kopf timers and daemons would hold an asyncio task per object and add finalizers; a heap holds a tuple per object.
Keys are typed: `IdentityKey(namespace, name)` of a WorkloadIdentity, `TrustDomainKey(name)` of a TrustDomain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from meshtls.policy.clock import Clock


class IdentityKey(NamedTuple):
    """A WorkloadIdentity in the heap: its renewal, or a retry."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class TrustDomainKey(NamedTuple):
    """A TrustDomain in the heap: its next CA rotation step, CRL re-signing or resync."""

    name: str

    def __str__(self) -> str:
        return f"TrustDomain {self.name}"


Key = IdentityKey | TrustDomainKey
log = logging.getLogger("meshtls.scheduler")
RETRY_FAILED = dt.timedelta(seconds=10)
IDLE_WAIT = 3600.0  # seconds asleep with nothing scheduled (schedule() wakes it sooner)
COMPACT_MIN = 64  # superseded entries tolerated before the heap is rebuilt from the live ones


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
        self._compact()
        if self._heap[0][1] == key:
            self._wake.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)
        self._compact()

    def wake(self) -> None:
        """Read the clock again now: after a fake clock was moved, or the wall clock jumped."""
        self._wake.set()

    def due_at(self, key: Key) -> dt.datetime | None:
        return self._due.get(key)

    def __len__(self) -> int:
        return len(self._due)

    @property
    def heap_size(self) -> int:
        """Entries in the heap, superseded ones included (bounded by compaction)."""
        return len(self._heap)

    def _compact(self) -> None:
        # every reschedule leaves the old entry behind: rebuild once the stale outnumber the live
        if len(self._heap) > COMPACT_MIN + 2 * len(self._due):
            self._heap = [(when, key) for key, when in self._due.items()]
            heapq.heapify(self._heap)

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
            timeout = (self._heap[0][0] - now).total_seconds() if self._heap else IDLE_WAIT
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.01))
            except TimeoutError:
                pass

    async def _run_one(self, key: Key) -> None:
        try:
            await self._work(key)
        except Exception:
            log.exception("work on %s failed; retrying in %d s", key, RETRY_FAILED.total_seconds())
            self.schedule(key, self._clock.now() + RETRY_FAILED)
        finally:
            self._slots.release()
