"""The renewal heap: one task for all identities; the latest schedule wins; failures retry."""

from __future__ import annotations

import asyncio
import datetime as dt

from meshtls.controller.scheduler import Key, RenewalScheduler
from meshtls.injection.target import InjectionTarget
from meshtls.injection.targets import TargetIndex
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE, RotationState, next_rotation_step
from meshtls.policy.clock import FakeClock

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


async def settle() -> None:
    """Let the scheduler and the work it started run as far as they can without time passing."""
    for _ in range(50):
        await asyncio.sleep(0)


def test_due_keys_run_once_in_order_and_rescheduling_supersedes() -> None:
    async def scenario() -> list[list[Key]]:
        ran: list[Key] = []
        seen: list[list[Key]] = []
        clock = FakeClock(T0)

        async def work(key: Key) -> None:
            ran.append(key)

        scheduler = RenewalScheduler(clock, work)
        task = asyncio.create_task(scheduler.run())
        scheduler.schedule(("a", "late"), T0 + 3 * HOUR)
        scheduler.schedule(("a", "early"), T0 + HOUR)
        scheduler.schedule(("a", "moved"), T0 + HOUR / 2)
        scheduler.schedule(("a", "moved"), T0 + 5 * HOUR)  # the latest call wins
        scheduler.schedule(("a", "gone"), T0 + HOUR)
        scheduler.forget(("a", "gone"))
        await settle()
        seen.append(list(ran))  # nothing is due at T0
        clock.advance(HOUR)
        scheduler.wake()  # the heap sleeps on the loop's clock: told that the fake one moved
        await settle()
        seen.append(list(ran))
        clock.advance(5 * HOUR)
        scheduler.wake()
        await settle()
        seen.append(list(ran))
        task.cancel()
        return seen

    assert asyncio.run(scenario()) == [[], [("a", "early")], [("a", "early"), ("a", "late"), ("a", "moved")]]


def test_a_failing_key_is_retried_ten_seconds_later() -> None:
    async def scenario() -> tuple[int, dt.datetime | None]:
        calls = 0
        clock = FakeClock(T0)

        async def work(key: Key) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("API down")

        scheduler = RenewalScheduler(clock, work)
        task = asyncio.create_task(scheduler.run())
        scheduler.schedule(("a", "b"), T0)
        await settle()
        task.cancel()
        return calls, scheduler.due_at(("a", "b"))

    assert asyncio.run(scenario()) == (1, T0 + dt.timedelta(seconds=10))


def test_superseded_entries_are_compacted_and_the_latest_schedule_still_wins() -> None:
    """Rescheduling the same keys again and again (every reconcile does) keeps the heap near the live keys."""
    for keys, rounds in ((1, 5000), (10, 500), (300, 20), (1000, 3)):
        async def scenario(keys: int = keys, rounds: int = rounds) -> tuple[int, int, list[Key]]:
            ran: list[Key] = []
            clock = FakeClock(T0)

            async def work(key: Key) -> None:
                ran.append(key)

            scheduler = RenewalScheduler(clock, work)
            biggest = 0
            for r in range(rounds):
                for k in range(keys):
                    scheduler.schedule(("a", f"k{k}"), T0 + HOUR + dt.timedelta(seconds=r + k))
                    biggest = max(biggest, scheduler.heap_size)
            for k in range(0, keys, 2):
                scheduler.forget(("a", f"k{k}"))
            task = asyncio.create_task(scheduler.run())
            clock.advance(HOUR + dt.timedelta(seconds=rounds + keys))
            scheduler.wake()
            for _ in range(keys):  # eight at a time: give every slot its turns
                await settle()
                if len(ran) == keys // 2:
                    break
            task.cancel()
            return biggest, scheduler.heap_size, ran

        biggest, left, ran = asyncio.run(scenario())
        assert biggest <= 64 + 2 * keys + 1, (keys, rounds, biggest)
        assert left <= 64 + keys, (keys, rounds, left)  # the due ran, the rest are superseded or forgotten
        assert sorted(ran) == sorted(("a", f"k{k}") for k in range(1, keys, 2)), (keys, rounds)


def test_target_index_answers_by_namespace_and_service_account() -> None:
    index = TargetIndex()
    web = InjectionTarget("web", "web", "spiffe://td/ns/a/sa/web", "web-mtls", "web-meshtls-proxy", "meshtls-bundle")
    index.put("a", web)
    assert index.lookup("a", "web") == [web]
    assert index.lookup("b", "web") == []
    assert index.lookup("a", "other") == []
    moved = InjectionTarget("web", "api", "spiffe://td/ns/a/sa/api", "web-mtls", "web-meshtls-proxy", "meshtls-bundle")
    index.put("a", moved)  # the identity's serviceAccountName changed
    assert index.lookup("a", "web") == [] and index.lookup("a", "api") == [moved]
    index.remove("a", "web")
    assert index.lookup("a", "api") == []


def test_ca_rotation_phases_with_a_fake_clock() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ca_not_after = t0 + dt.timedelta(days=365)
    window, delay = dt.timedelta(days=100), dt.timedelta(seconds=90)
    stable = RotationState()
    assert next_rotation_step(stable, t0, ca_not_after, window, delay).action == "wait"
    assert next_rotation_step(stable, ca_not_after - window, ca_not_after, window, delay).action == "start"
    assert next_rotation_step(stable, t0, ca_not_after, window, delay, request="r1").action == "start"
    assert next_rotation_step(RotationState(STABLE, last_request="r1"), t0, ca_not_after, window, delay,
                              request="r1").action == "wait"
    brought = next_rotation_step(stable, ca_not_after - window, ca_not_after, window, delay, can_generate=False)
    assert brought.action == "warn" and "replace" in brought.reason
    preparing = RotationState(PREPARING, t0)
    assert next_rotation_step(preparing, t0 + dt.timedelta(seconds=89), ca_not_after, window, delay).action == "wait"
    assert next_rotation_step(preparing, t0 + delay, ca_not_after, window, delay).action == "switch"
    rotating = RotationState(ROTATING, t0, t0 + dt.timedelta(hours=25))
    assert next_rotation_step(rotating, t0 + dt.timedelta(hours=24), ca_not_after, window, delay).action == "wait"
    assert next_rotation_step(rotating, t0 + dt.timedelta(hours=25), ca_not_after, window, delay).action == "retire"
