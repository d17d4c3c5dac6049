"""`make bench-pki`: leaf issuances per second on one core, per algorithm, beside cryptography's own floor.

The floor issues a bare certificate (key, one SAN, sign, PEM) with cryptography alone, in the same run, so the
ratio says how much meshtls's own code costs on a noisy, shared machine.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtls.pki import KeyAlgorithm, generate_ca, issue_svid, workload_spiffe_id
from meshtls.pki.keys import generate_private_key, signature_hash

GOAL_P256_PER_SECOND = 10_000


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        count += 20
    return count / elapsed


def _floor(algorithm: KeyAlgorithm) -> Callable[[], object]:
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca("bench.example", now)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "floor")])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://bench.example/ns/a/sa/b")])

    def issue() -> object:
        key = generate_private_key(algorithm)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(ca.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(san, critical=False).sign(ca.key, signature_hash(ca.key))
        )
        return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    return issue


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca("bench.example", now)
    sid = workload_spiffe_id("bench.example", "shop", "web")
    results: list[dict[str, Any]] = []
    print(f"{'algorithm':<12} {'meshtls/s':>10} {'floor/s':>10} {'ratio':>6}   (one core, {seconds:.0f} s each)")
    for algorithm in KeyAlgorithm:
        budget = seconds if not algorithm.is_rsa else max(seconds / 2, 0.5)
        def ours_issue(a: KeyAlgorithm = algorithm) -> object:
            return issue_svid(ca, sid, now, dt.timedelta(hours=1), ("web.shop.svc",), a)

        ours = _rate(ours_issue, budget)
        floor = _rate(_floor(algorithm), budget)
        results.append({"algorithm": algorithm.value, "meshtls_per_s": round(ours), "floor_per_s": round(floor),
                        "ratio": round(ours / floor, 3)})
        print(f"{algorithm.value:<12} {ours:>10.0f} {floor:>10.0f} {ours / floor:>6.2f}", flush=True)
    p256 = results[0]
    verdict = "meets" if p256["meshtls_per_s"] >= GOAL_P256_PER_SECOND else "BELOW"
    print(f"P-256: {p256['meshtls_per_s']}/s {verdict} the goal of {GOAL_P256_PER_SECOND}/s "
          f"({p256['ratio']:.2f}x cryptography's floor in this run)")
    print(json.dumps({"bench": "pki", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
