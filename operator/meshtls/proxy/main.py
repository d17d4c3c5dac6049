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

from meshtls.api.ports import WORKLOAD_API_ADMIN_PORT
from meshtls.dataplane.config import SidecarConfig, load_sidecar_config
from meshtls.dataplane.layout import BUNDLE_DIR, IDENTITY_DIR, WORKLOAD_API_DIR, WORKLOAD_API_SOCKET
from meshtls.pki.errors import PKIError
from meshtls.pki.spiffe import parse_spiffe_id
from meshtls.proxy.server import DEFAULT_BIND, Proxy, log
from meshtls.proxy.volumes import Bundle, Identity
from meshtls.proxy.workload_api import DEFAULT_SOCKET_MODE, WorkloadApiServer, socket_mode

BIND_ENV = "MESHTLS_PROXY_BIND_ADDRESS"
ACCESS_LOG_ENV = "MESHTLS_PROXY_ACCESS_LOG"
LOG_LEVEL_ENV = "MESHTLS_PROXY_LOG_LEVEL"
TICKETS_ENV = "MESHTLS_PROXY_SESSION_TICKETS"
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def attach_workload_api(proxy: Proxy, socket_path: str, mode: int) -> WorkloadApiServer:
    """The Workload API served from the proxy's own reloads of the identity and bundle."""
    def source() -> tuple[Identity | None, Bundle | None, str | None]:
        contexts = proxy.contexts
        error = proxy.reloader.status.last_error
        return (contexts.identity, contexts.bundle, error) if contexts else (None, None, error)

    server = WorkloadApiServer(socket_path, source, proxy.config.identity_dir,
                               proxy.config.spiffe_id, mode, proxy.clock, proxy.log.getChild("workload_api"))
    proxy.observers.append(server.refresh)
    proxy.metric_sources.append(server.metrics)
    return server


async def _serve(proxy: Proxy, drain_seconds: float, workload_api: WorkloadApiServer | None = None) -> None:
    loop = asyncio.get_running_loop()
    await proxy.start()
    if workload_api is not None:
        await workload_api.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, proxy.request_stop)
    await proxy.wait_stopped()
    log.info("stop signal: draining for up to %gs", drain_seconds)
    if workload_api is not None:
        await workload_api.close()
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
    _workload_api_arguments(parser, required=False)
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
    workload_api = attach_workload_api(proxy, args.workload_api_socket, args.workload_api_socket_mode) \
        if args.workload_api_socket else None
    return _run(proxy, args.drain_seconds, workload_api)


def _workload_api_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    default = f"{WORKLOAD_API_DIR}/{WORKLOAD_API_SOCKET}"
    parser.add_argument("--workload-api-socket", required=False, default=default if required else None,
                        help="serve the SPIFFE Workload API on this Unix socket (docs/workload-api.md)"
                             + (f"; default {default}" if required else "; off when absent"))
    parser.add_argument("--workload-api-socket-mode", type=socket_mode, default=DEFAULT_SOCKET_MODE,
                        help=f"the socket's permissions, octal (default {DEFAULT_SOCKET_MODE:o}: the pod's emptyDir "
                             "is the boundary; 0660 when the pod's fsGroup owns it)")


def _run(proxy: Proxy, drain_seconds: float, workload_api: WorkloadApiServer | None) -> int:
    try:
        asyncio.run(_serve(proxy, drain_seconds, workload_api))
    except OSError as exc:
        print(f"meshtls-proxy: cannot listen: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def workload_api_main(argv: list[str] | None = None) -> int:
    """`meshtls-workload-api`: the Workload API alone, for pods whose data plane is Envoy (no meshtls-proxy there
    to host it): the same reloader, server and admin endpoint, with no listeners."""
    parser = argparse.ArgumentParser(prog="meshtls-workload-api",
                                     description="the SPIFFE Workload API from meshtls's mounted identity")
    parser.add_argument("--spiffe-id", required=True, help="this pod's SPIFFE ID: nothing else is served")
    parser.add_argument("--identity-dir", default=IDENTITY_DIR, help=f"the identity Secret (default {IDENTITY_DIR})")
    parser.add_argument("--bundle-dir", default=BUNDLE_DIR, help=f"the trust bundle (default {BUNDLE_DIR})")
    parser.add_argument("--admin-port", type=int, default=WORKLOAD_API_ADMIN_PORT,
                        help=f"/healthz, /readyz and /metrics (default {WORKLOAD_API_ADMIN_PORT})")
    parser.add_argument("--admin-address", default="0.0.0.0")
    parser.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    _workload_api_arguments(parser, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        parse_spiffe_id(args.spiffe_id, "--spiffe-id")
    except PKIError as exc:
        print(f"meshtls-workload-api: {exc.field}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    config = SidecarConfig(spiffe_id=args.spiffe_id, identity_dir=args.identity_dir, bundle_dir=args.bundle_dir,
                           admin_port=args.admin_port, admin_address=args.admin_address)
    proxy = Proxy(config, access_log=False)
    return _run(proxy, 0.0, attach_workload_api(proxy, args.workload_api_socket, args.workload_api_socket_mode))


if __name__ == "__main__":
    sys.exit(main())
