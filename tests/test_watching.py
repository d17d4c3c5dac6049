"""The watches outside kopf (controller/watching.py): events of one object in order and never two at once, objects
in parallel, the newest event wins while one is handled, nothing kept for an idle object; a managed Secret's
events schedule its identity only when its content is not what meshtls wrote."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.watching import PerObject, on_managed_secret_event
from meshtls.policy.issuance import secret_digest

A, B = IdentityKey("ns", "a"), IdentityKey("ns", "b")


def test_one_object_at_a_time_objects_in_parallel_the_newest_event_wins() -> None:
    async def scenario() -> None:
        seen: list[tuple[str, str]] = []
        running: set[str] = set()
        overlap: list[str] = []
        gate = asyncio.Event()

        async def handle(event_type: str, obj: dict[str, Any]) -> None:
            name = obj["name"]
            if name in running:
                overlap.append(name)
            running.add(name)
            seen.append((name, event_type))
            if event_type == "first":
                await gate.wait()
            running.discard(name)

        queue = PerObject(handle, concurrency=8)
        queue.submit(A, "first", {"name": "a"})
        queue.submit(B, "first", {"name": "b"})
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert sorted(seen) == [("a", "first"), ("b", "first")]  # both objects at once
        for kind in ("second", "third", "newest"):  # arrive while "a" is being handled
            queue.submit(A, kind, {"name": "a"})
        gate.set()
        await queue.idle()
        assert [e for n, e in seen if n == "a"] == ["first", "newest"]
        assert overlap == []
        assert queue.pending == {} and queue.running == set() and not queue.tasks

    asyncio.run(scenario())


def test_a_failing_handler_does_not_stop_later_events() -> None:
    async def scenario() -> None:
        seen: list[str] = []

        async def handle(event_type: str, obj: dict[str, Any]) -> None:
            seen.append(event_type)
            if event_type == "boom":
                raise RuntimeError("handler failed")

        queue = PerObject(handle)
        queue.submit(A, "boom", {})
        await queue.idle()
        queue.submit(A, "after", {})
        await queue.idle()
        assert seen == ["boom", "after"]

    asyncio.run(scenario())


def test_concurrency_is_bounded() -> None:
    async def scenario() -> None:
        now_running = peak = 0

        async def handle(event_type: str, obj: dict[str, Any]) -> None:
            nonlocal now_running, peak
            now_running += 1
            peak = max(peak, now_running)
            await asyncio.sleep(0.001)
            now_running -= 1

        queue = PerObject(handle, concurrency=3)
        for i in range(20):
            queue.submit(IdentityKey("ns", f"w{i}"), "ADDED", {})
        await queue.idle()
        assert peak == 3

    asyncio.run(scenario())


class _Scheduler:
    def __init__(self) -> None:
        self.due: list[IdentityKey] = []

    def schedule(self, key: IdentityKey, when: dt.datetime) -> None:
        self.due.append(key)


class _Clock:
    def now(self) -> dt.datetime:
        return dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


class _Op:
    def __init__(self) -> None:
        self.scheduler = _Scheduler()
        self.clock = _Clock()
        self.secret_digests: dict[IdentityKey, str] = {}


def secret(data: dict[str, bytes], identity: str = "a") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": f"{identity}-mtls",
                         "labels": {"app.kubernetes.io/managed-by": "meshtls", "meshtls.dev/identity": identity}},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def test_a_managed_secret_is_looked_at_again_only_when_deleted_or_not_what_meshtls_wrote() -> None:
    async def scenario() -> None:
        op: Any = _Op()
        written = {"tls.crt": b"cert", "tls.key": b"key", "ca.crt": b"ca"}
        op.secret_digests[A] = secret_digest(written)
        for event_type in ("MODIFIED", "", "ADDED"):  # our own write coming back, or a listing: nothing to do
            await on_managed_secret_event(op, event_type, secret(written))
        assert op.scheduler.due == []
        await on_managed_secret_event(op, "MODIFIED", secret({**written, "tls.key": b"other"}))
        await on_managed_secret_event(op, "", secret({**written, "tls.key": b"other"}))  # tampered while unwatched
        await on_managed_secret_event(op, "DELETED", secret(written))
        assert op.scheduler.due == [A, A, A]
        # listed before its identity was looked at: that identity's own reconcile is coming
        await on_managed_secret_event(op, "", secret({"x": b"y"}, identity="b"))
        assert op.scheduler.due == [A, A, A]
        # changed before meshtls verified it in this run: looked at
        await on_managed_secret_event(op, "MODIFIED", secret({"x": b"y"}, identity="b"))
        assert op.scheduler.due == [A, A, A, B]

    asyncio.run(scenario())


def test_identity_gauges_are_one_row_per_identity_rendered_at_scrape_time() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from meshtls.controller.metrics import IdentityGauges

    gauges = IdentityGauges()
    registry = CollectorRegistry()
    registry.register(gauges)
    gauges.record("ns", "a", "spiffe://td/ns/ns/sa/a", 200.0, 100.0)
    gauges.record("ns", "a", "spiffe://td/ns/ns/sa/a", None, 150.0)  # expiry unknown now: the last one stays
    gauges.record("ns", "b", "spiffe://td/ns/ns/sa/b", None, 120.0)  # never known: no expiration sample
    text = generate_latest(registry).decode()
    a = 'name="a",namespace="ns",spiffe_id="spiffe://td/ns/ns/sa/a"'
    b = 'name="b",namespace="ns",spiffe_id="spiffe://td/ns/ns/sa/b"'
    assert f"meshtls_certificate_expiration_timestamp_seconds{{{a}}} 200.0" in text
    assert f"meshtls_certificate_renewal_timestamp_seconds{{{a}}} 150.0" in text
    assert f"meshtls_certificate_ready_status{{{b}}} 1.0" in text
    assert f"meshtls_certificate_expiration_timestamp_seconds{{{b}}}" not in text
    gauges.record("ns", "a", "spiffe://other/ns/ns/sa/a", None, 160.0)  # a new SPIFFE ID replaces the row
    gauges.forget("ns", "b")
    text = generate_latest(registry).decode()
    assert "spiffe://td/ns/ns/sa/a" not in text and b not in text and len(gauges.rows) == 1
