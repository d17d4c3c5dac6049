"""`meshtls operator`: run the operator (kopf underneath) against the current kubeconfig or in-cluster."""

from __future__ import annotations

import argparse
import os

from meshtls.api.model import DEFAULT_DATA_PLANE, DataPlane
from meshtls.api.names import DEFAULT_SIDECAR_IMAGE
from meshtls.cli.errors import Parser, UsageError


def add_operator_command(sub: argparse._SubParsersAction[Parser]) -> None:
    p = sub.add_parser("operator", help="run the meshtls operator")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                       help="watch only this namespace (repeatable); default: all namespaces")
    scope.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("--operator-namespace", default=os.environ.get("MESHTLS_NAMESPACE", "meshtls-system"),
                   help="where CA state Secrets live (default $MESHTLS_NAMESPACE or meshtls-system)")
    p.add_argument("--kubeconfig", default=None)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port, 0 to disable")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz, 0 to disable")
    p.add_argument("--peering", default=None, help="kopf peering name: run several replicas, one acts")
    p.add_argument("--priority", type=int, default=0, help="peering priority (distinct per replica)")
    p.add_argument("--peering-lifetime", type=int, default=60,
                   help="seconds after which a silent (killed) peer is forgotten and another replica takes over")
    p.add_argument("--webhook-port", type=int, default=0, help="serve the injection webhook on this port")
    p.add_argument("--webhook-host", default="127.0.0.1", help="URL mode: the host the API server calls")
    p.add_argument("--webhook-service", default=None, help="Service mode: the webhook Service's name")
    p.add_argument("--webhook-failure-policy", default="Ignore", choices=["Ignore", "Fail"])
    p.add_argument("--sidecar-image", default=os.environ.get("MESHTLS_SIDECAR_IMAGE", DEFAULT_SIDECAR_IMAGE),
                   help="image of the injected sidecar container (meshtls-proxy or Envoy: the same image)")
    p.add_argument("--default-data-plane",
                   default=os.environ.get("MESHTLS_DEFAULT_DATA_PLANE", DEFAULT_DATA_PLANE.value),
                   choices=[d.value for d in DataPlane],
                   help="the sidecar injected when neither a WorkloadIdentity (spec.dataPlane) nor its TrustDomain "
                        "(spec.sidecar.dataPlane) names one (default $MESHTLS_DEFAULT_DATA_PLANE or "
                        f"{DEFAULT_DATA_PLANE.value}; the Helm chart sets envoy, the winner of the data-plane "
                        "benchmark, see docs/operations.md)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshtls.operator.run import run_operator
    from meshtls.operator.settings import OperatorOptions

    for port_name in ("metrics_port", "health_port", "webhook_port"):
        port = getattr(args, port_name)
        if not 0 <= port <= 65535:
            raise UsageError(f"--{port_name.replace('_', '-')}", f"{port} is not a port (0-65535)")
    run_operator(OperatorOptions(
        operator_namespace=args.operator_namespace,
        namespaces=list(args.namespaces),
        kubeconfig=args.kubeconfig,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        peering=args.peering,
        priority=args.priority,
        peering_lifetime=args.peering_lifetime,
        webhook_port=args.webhook_port,
        webhook_host=args.webhook_host,
        webhook_service=args.webhook_service,
        webhook_failure_policy=args.webhook_failure_policy,
        sidecar_image=args.sidecar_image,
        default_data_plane=args.default_data_plane,
    ), verbose=args.verbose)
    return 0
