"""`meshtls-proxy`: the L4 mTLS sidecar's command line.

inbound:  peer sidecar --TLS, client certificate required--> 0.0.0.0:port --plain--> 127.0.0.1:appPort
outbound: app --plain--> 127.0.0.1:listenPort --TLS, our certificate--> address (peer SPIFFE ID checked)

Identity and trust bundle are polled (`..data` symlink); a change builds new SSL contexts used by new handshakes
only, so open connections keep flowing through a rotation. Sessions resume between sidecars (TLS 1.3 tickets);
a new context generation drops them, so a CRL update also forces full handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from meshtls.dataplane.config import load_sidecar_config
from meshtls.pki.errors import PKIError
from meshtls.proxy.server import DEFAULT_BIND, Proxy, log

BIND_ENV = "MESHTLS_PROXY_BIND_ADDRESS"
ACCESS_LOG_ENV = "MESHTLS_PROXY_ACCESS_LOG"
LOG_LEVEL_ENV = "MESHTLS_PROXY_LOG_LEVEL"
TICKETS_ENV = "MESHTLS_PROXY_SESSION_TICKETS"
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


async def _serve(proxy: Proxy, drain_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    await proxy.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, proxy.request_stop)
    await proxy.wait_stopped()
    log.info("stop signal: draining for up to %gs", drain_seconds)
    await proxy.shutdown(drain_seconds)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshtls-proxy", description="meshtls mTLS sidecar (L4 proxy)")
    parser.add_argument("--config", required=True, help="the sidecar config (proxy.yaml) rendered by the operator")
    parser.add_argument("--bind", default=os.environ.get(BIND_ENV, DEFAULT_BIND),
                        help=f"address for inbound listeners (env {BIND_ENV}; default {DEFAULT_BIND}; "
                             "'' for every address of every family)")
    parser.add_argument("--session-tickets", type=int, choices=range(0, 5), metavar="N",
                        default=os.environ.get(TICKETS_ENV, "1"),  # a string default goes through type=int
                        help=f"TLS 1.3 session tickets per inbound handshake (env {TICKETS_ENV}; default 1; "
                             "0 disables resumption)")
    parser.add_argument("--drain-seconds", type=float, default=5.0,
                        help="on SIGTERM, how long open connections may finish (default 5)")
    parser.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    parser.add_argument("--no-access-log", action="store_true",
                        help="do not log accepted connections (the first of each peer certificate at INFO, the "
                             f"others at DEBUG; env {ACCESS_LOG_ENV}=0)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        print(f"meshtls-proxy: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_sidecar_config(text)
    except PKIError as exc:
        print(f"meshtls-proxy: invalid config {args.config}: {exc.field}: {_one_line(exc.message)}", file=sys.stderr)
        return EXIT_CONFIG
    except (AttributeError, TypeError, ValueError) as exc:  # shapes the schema parser does not name
        print(f"meshtls-proxy: invalid config {args.config}: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    access_log = not args.no_access_log and os.environ.get(ACCESS_LOG_ENV, "1") not in ("0", "false", "no")
    proxy = Proxy(config, bind_address=args.bind, access_log=access_log, session_tickets=args.session_tickets)
    try:
        asyncio.run(_serve(proxy, args.drain_seconds))
    except OSError as exc:
        print(f"meshtls-proxy: cannot listen: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
