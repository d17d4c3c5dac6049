"""Revocations, batched: a burst of deletions costs one state write, one CRL signing and one ConfigMap write per
namespace, not one per deletion. Entries leave the CRL once their certificate has expired."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING

from meshtls.api.names import state_secret_name
from meshtls.controller import metrics
from meshtls.controller.trust.domain import TrustDomainRuntime
from meshtls.controller.trust.state import read_revocations, save_state
from meshtls.kube import Conflict
from meshtls.pki import RevokedCertificate, build_crl, crl_pem, drop_expired
from meshtls.policy.trust_policy import crl_resign_at

if TYPE_CHECKING:
    from meshtls.controller.trust.registry import TrustDomains

log = logging.getLogger("meshtls.trust")
BATCH_WINDOW = 0.25  # seconds a revocation waits for others to share its CRL signing
# a storm's rounds start at least this far apart: each writes the whole CRL into every bundle, and rounds back to back
# (each under a second on their own lane) slowed the deletions themselves more than they shortened the wait
ROUND_SECONDS = 1.0


def crl_inputs(runtime: TrustDomainRuntime) -> tuple[object, ...]:
    return (runtime.crl_number, tuple(sorted(e.serial_number for e in runtime.revocations)),
            tuple(ca.fingerprint for ca in runtime.trusted))


def crls_stale(runtime: TrustDomainRuntime, now: dt.datetime) -> bool:
    """Re-sign when what the CRLs say changed, or half their validity has passed: sidecars refuse every peer
    once a CRL is past its nextUpdate, so it is renewed long before that, but not on every look."""
    signed = runtime.crl_signed
    return (signed is None or signed[1] != crl_inputs(runtime)
            or now >= crl_resign_at(signed[0], runtime.spec.crl_validity))


def sign_crls(runtime: TrustDomainRuntime, now: dt.datetime) -> None:
    # One CRL per trusted CA: a sidecar checking a leaf needs the CRL of that leaf's issuer.
    runtime.crl_signed = (now, crl_inputs(runtime))
    runtime.crl = b"".join(crl_pem(build_crl(ca, runtime.revocations, runtime.crl_number, now,
                                             runtime.spec.crl_validity))
                           for ca in runtime.trusted)


async def revoke(trust: TrustDomains, runtime: TrustDomainRuntime, entries: list[RevokedCertificate]) -> None:
    """Put serials on the CRL and publish it everywhere; returns once every bundle carries it."""
    if not entries:
        return
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    runtime.pending.append((entries, future))
    if runtime.flusher is None or runtime.flusher.done():
        runtime.flusher = asyncio.create_task(_flush(trust, runtime))
    await future


async def _flush(trust: TrustDomains, runtime: TrustDomainRuntime) -> None:
    await asyncio.sleep(BATCH_WINDOW)
    while runtime.pending:
        started = time.monotonic()
        batch, runtime.pending = runtime.pending, []
        try:
            async with runtime.lock:
                await _persist_revocations(trust, runtime, [e for entries, _ in batch for e in entries])
            saved = time.monotonic()
            written = await trust.publish(runtime)
            await trust.write_status(runtime)
            # one line per round: how a storm was batched and where each round's time went
            log.info("CRL #%d of %s: %d revocation(s) batched; state saved in %.2f s, %d bundle(s) written in %.2f s",
                     runtime.crl_number, runtime.name, len(batch), saved - started, written,
                     time.monotonic() - saved)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            continue
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        if runtime.pending:
            await asyncio.sleep(started + ROUND_SECONDS - time.monotonic())


async def _persist_revocations(trust: TrustDomains, runtime: TrustDomainRuntime,
                               entries: list[RevokedCertificate]) -> None:
    for _attempt in range(5):
        now = trust.clock.now()
        state = await trust.kube.run_first(trust.kube.read_secret, trust.namespace, state_secret_name(runtime.name))
        # a deleted state Secret is written back from memory, revocations included
        stored, number = read_revocations(state) if state.exists else (runtime.revocations, runtime.crl_number)
        known = {e.serial_number for e in stored}
        merged = drop_expired(stored + [e for e in entries if e.serial_number not in known], now)
        runtime.revocations, runtime.crl_number = merged, max(number, runtime.crl_number) + 1
        try:
            await save_state(trust.kube, trust.namespace, runtime, state)
        except Conflict:
            continue
        sign_crls(runtime, now)
        metrics.revoked.labels(runtime.name).inc(len(entries))
        metrics.crl_entries.labels(runtime.name).set(len(merged))
        return
    raise Conflict(f"could not update {state_secret_name(runtime.name)} after 5 attempts")
