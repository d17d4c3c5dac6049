"""Revoking what an identity leaves behind. Deleted: every still-valid serial onto the CRL of the trust domain that
issued it, published everywhere, then its Secret goes (the finalizer `meshtls.dev/revoke-on-delete` holds it until
then). A spec change: what the old values left valid, and the Secret under an old name."""

from __future__ import annotations

import logging
from typing import Any

from meshtls.api.constants import LABEL_TRUST_DOMAIN
from meshtls.api.names import default_secret_name
from meshtls.api.reasons import Reason
from meshtls.controller import metrics
from meshtls.controller.overlaps import recheck_overlaps
from meshtls.controller.runtime import Operator, identity_lock
from meshtls.controller.scheduler import IdentityKey
from meshtls.controller.trust.domain import TrustDomainError, TrustDomainRuntime
from meshtls.pki import RevocationReason, RevokedCertificate, load_certificates
from meshtls.policy.issuance import Superseded, revocations_by_issuer

log = logging.getLogger("meshtls.identity")


async def _issuer_for_revocation(op: Operator, name: str | None
                                 ) -> tuple[TrustDomainRuntime | None, tuple[str, str]]:
    """The trust domain that signed a deleted identity's certificates, or None with (Event reason, why)."""
    try:
        if name:
            runtime = await op.trust.get_existing(name)
            # not loaded (yet) but there: load it; gone: get() says so
            return runtime or await op.trust.get(name), ("", "")
        return await op.trust.resolve(None, None), ("", "")
    except TrustDomainError as exc:
        log.info("revoking under trust domain %s: %s", name or "(default)", exc.message)
        reason = Reason.TRUST_DOMAIN_GONE if exc.reason == Reason.UNKNOWN_TRUST_DOMAIN else Reason.REVOCATION_SKIPPED
        return None, (reason, exc.message)


async def _trust_domain_deleted(op: Operator, name: str) -> bool:
    """A revocation failed: only the TrustDomain object being gone (or going) makes that final, not an error."""
    try:
        body = await op.kube.run(op.kube.get_trust_domain, name)
    except Exception:
        return False
    return body is None or bool(body.get("metadata", {}).get("deletionTimestamp"))


async def revoke_on_delete(op: Operator, body: dict[str, Any]) -> None:
    """Every still-valid serial of the identity goes on the CRL of the trust domain that issued it, published
    everywhere; then the Secret goes."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    key = IdentityKey(namespace, name)
    op.scheduler.forget(key)
    async with identity_lock(op, key):
        status = dict(body.get("status") or {})
        spec_td = (body.get("spec") or {}).get("trustDomain") or status.get("trustDomain")
        secret_name = (body.get("spec") or {}).get("secretName") or default_secret_name(name)
        # on the lane of what a CRL publication waits for: in a storm, not behind the cleanup of earlier deletions
        secret = await op.kube.run_first(op.kube.read_secret, namespace, secret_name)
        owned = secret.exists and secret.owned_by(body["metadata"]["uid"])
        now = op.clock.now()
        by_issuer = revocations_by_issuer(status, str(spec_td or ""), now)
        if owned and secret.data.get("tls.crt"):
            try:  # the Secret's own certificate, in case the status never recorded it (a crash mid-issuance)
                cert = load_certificates(secret.data["tls.crt"])[0]
                serial = format(cert.serial_number, "x")
                if cert.not_valid_after_utc > now and not any(serial == s for group in by_issuer.values()
                                                              for s, _ in group):
                    issuer = secret.labels.get(LABEL_TRUST_DOMAIN) or str(spec_td or "")
                    by_issuer.setdefault(issuer, []).append((serial, cert.not_valid_after_utc))
            except Exception:
                pass
        published: list[str] = []
        gone: list[tuple[str, str]] = []  # (Event reason, why) per trust domain that can no longer sign a CRL
        for trust_domain, serials in by_issuer.items():
            listed = ", ".join(s for s, _ in serials)
            runtime, why = await _issuer_for_revocation(op, trust_domain or None)
            if runtime is None:
                # nothing can publish a CRL for a trust domain that no longer exists: holding the finalizer helps nobody
                gone.append(why)
                published.append(f"{listed} not put on any CRL ({why[1]})")
                continue
            try:
                await op.trust.revoke(runtime, [RevokedCertificate(int(serial, 16), now, not_after,
                                                                   RevocationReason.CESSATION_OF_OPERATION)
                                                for serial, not_after in serials])
            except Exception:
                if not await _trust_domain_deleted(op, trust_domain):
                    raise  # retried: the serials must reach the CRL before the finalizer goes
                log.info("%s/%s deleted; trust domain %s was deleted too: no CRL to publish", namespace, name,
                         trust_domain)
                gone.append((Reason.TRUST_DOMAIN_GONE, f"trust domain {trust_domain} was deleted"))
                published.append(f"{listed} not put on any CRL (trust domain {trust_domain} was deleted)")
                continue
            published.append(f"{listed} on the CRL of {runtime.name} (#{runtime.crl_number})")
        await op.trust.unbind(key)
        if owned and secret.uid:
            await op.kube.run(op.kube.delete_secret, namespace, secret_name, secret.uid)
        secret_note = f"Secret {secret_name} {'deleted' if owned else 'left (not ours)'}"
        if gone:
            await op.post_event(body, "Warning", gone[0][0], f"revoked serial(s) {'; '.join(published)}: no CA is "
                                                            f"left to sign a CRL for some; {secret_note}")
        else:
            await op.post_event(body, "Normal", Reason.REVOKED,
                                f"revoked serial(s) {'; '.join(published) or 'none'}; {secret_note}")
        metrics.forget_identity(namespace, name, str(status.get("spiffeID", "")))
        op.rendered.pop(key, None)
        op.secret_digests.pop(key, None)
        op.targets.remove(namespace, name)
        recheck_overlaps(op, namespace, op.selection.remove(namespace, name))


async def revoke_superseded(op: Operator, body: dict[str, Any], superseded: Superseded) -> frozenset[str]:
    """Revoke what a spec change left valid, each serial on the CRL of the trust domain that issued it, and remove
    the Secret under the old name (only ours). Returns the serials dealt with."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    now = op.clock.now()
    done: set[str] = set()
    told: list[str] = []
    for trust_domain, serials in superseded.serials.items():
        runtime, (why_reason, why) = await _issuer_for_revocation(op, trust_domain)
        if runtime is None:
            if why_reason == Reason.TRUST_DOMAIN_GONE:
                # its CA is gone with it: no sidecar trusts those certificates any more, and there is no CRL to publish
                told.append(f"trust domain {trust_domain} is gone ({why}): {len(serials)} serial(s) need no CRL")
                done.update(serial for serial, _ in serials)
            else:  # unusable for now: they stay in activeSerials, and the identity's deletion revokes them again
                told.append(f"trust domain {trust_domain} cannot sign a CRL now ({why}); {len(serials)} serial(s) "
                            "kept for deletion")
            continue
        try:
            await op.trust.revoke(runtime, [RevokedCertificate(int(serial, 16), now, not_after,
                                                               RevocationReason.SUPERSEDED)
                                            for serial, not_after in serials])
        except Exception as exc:
            if await _trust_domain_deleted(op, trust_domain):
                told.append(f"trust domain {trust_domain} was deleted: {len(serials)} serial(s) need no CRL")
                done.update(serial for serial, _ in serials)
                continue
            # they stay in activeSerials: the identity's deletion revokes them again
            log.warning("%s/%s: revoking superseded serials under %s failed: %s", namespace, name, trust_domain, exc)
            told.append(f"revoking {len(serials)} serial(s) under {trust_domain} failed ({exc}); kept for deletion")
            continue
        done.update(serial for serial, _ in serials)
        told.append(f"revoked {', '.join(s for s, _ in serials)} on the CRL of {trust_domain} "
                    f"(#{runtime.crl_number})")
    if superseded.old_secret_name:
        old = await op.kube.run(op.kube.read_secret, namespace, superseded.old_secret_name)
        if old.exists and old.owned_by(body["metadata"]["uid"]) and old.uid:
            await op.kube.run(op.kube.delete_secret, namespace, superseded.old_secret_name, old.uid)
            told.append(f"Secret {superseded.old_secret_name} deleted")
    message = f"{superseded.reason}: " + ("; ".join(told) or "nothing was left valid")
    log.info("%s/%s Superseded: %s", namespace, name, message)
    await op.post_event(body, "Normal", Reason.SUPERSEDED, message)
    return frozenset(done)
