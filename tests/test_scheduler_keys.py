"""Typed heap keys: identities and trust domains share one heap and are told apart by type, not by a convention."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools

import pytest

from meshtls.controller.scheduler import IdentityKey, Key, RenewalScheduler, TrustDomainKey
from meshtls.policy.clock import FakeClock

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NAMES = ["", "a", "web", "example.org", "x" * 63, "a/b"]


@pytest.mark.parametrize(("first", "second"), list(itertools.product(NAMES, NAMES)))
def test_an_identity_and_a_trust_domain_never_share_a_key(first: str, second: str) -> None:
    identity, trust_domain = IdentityKey(first, second), TrustDomainKey(second)
    assert identity != trust_domain
    assert len({identity, trust_domain, IdentityKey(first, second)}) == 2
    assert isinstance(trust_domain, TrustDomainKey) and not isinstance(identity, TrustDomainKey)


def test_keys_of_both_kinds_due_at_the_same_time_all_run_with_their_type() -> None:
    async def scenario() -> list[Key]:
        ran: list[Key] = []
        clock = FakeClock(T0)

        async def work(key: Key) -> None:
            ran.append(key)

        scheduler = RenewalScheduler(clock, work)
        task = asyncio.create_task(scheduler.run())
        keys: list[Key] = [k for name in NAMES for k in (IdentityKey("ns", name), TrustDomainKey(name))]
        for key in keys:  # equal due times: the heap orders the keys themselves, of both kinds
            scheduler.schedule(key, T0)
        for _ in range(100):
            await asyncio.sleep(0)
        task.cancel()
        return ran

    ran = asyncio.run(scenario())
    assert sorted(map(repr, ran)) == sorted(repr(k) for name in NAMES
                                            for k in (IdentityKey("ns", name), TrustDomainKey(name)))
    assert {type(k) for k in ran} == {IdentityKey, TrustDomainKey}
