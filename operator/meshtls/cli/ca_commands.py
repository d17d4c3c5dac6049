"""`meshtls ca rotate | status`: a TrustDomain's CA and its rotation (also `kubectl meshtls ca ...`).

Declarations only; the work is in `ca_ops`, imported when a command runs (the Kubernetes client is slow to import).
"""

from __future__ import annotations

import argparse
from typing import Any

from meshtls.cli.cluster_commands import OUTPUT_FORMATS
from meshtls.cli.errors import Parser


def add_ca_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    cluster = Parser(add_help=False)
    group = cluster.add_argument_group("cluster")
    group.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    group.add_argument("--context", default=None, help="kubeconfig context (default: the current context)")
    output = Parser(add_help=False)
    output.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="table (default), json, yaml")

    ca = sub.add_parser("ca", help="a TrustDomain's CA: rotate it, show it",
                        description="The CAs of the TrustDomains: `ca status` shows them and their rotation phase, "
                                    "`ca rotate` starts a rotation now.")
    verbs = ca.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)

    p = verbs.add_parser("status", parents=[cluster, output], help="CA fingerprint, expiry, rotation phase, CRL",
                         description="A table of TrustDomains: CA fingerprint and notAfter, rotation phase and since "
                                     "when, next/previous CA, when the old CA retires, CRL number and entries, "
                                     "Ready. With TRUSTDOMAIN: that one, and its conditions.")
    p.add_argument("name", nargs="?", metavar="TRUSTDOMAIN")
    p.set_defaults(func=_run("status"))

    p = verbs.add_parser("rotate", parents=[cluster, output], help="start a CA rotation now (--wait: follow it)",
                         description="Set the annotation meshtls.dev/rotate-ca on TRUSTDOMAIN to a fresh request id: "
                                     "the operator adds a new CA to every bundle (Preparing), and after "
                                     "spec.ca.propagationDelay signs with it (Rotating). With --wait, print each "
                                     "phase as it comes and return once signing has switched. A brought CA "
                                     "(spec.ca.secretRef) is rotated by replacing its Secret instead.")
    p.add_argument("name", metavar="TRUSTDOMAIN")
    p.add_argument("--wait", action="store_true", help="follow the rotation until signing switches to the new CA")
    p.add_argument("--timeout", default=None,
                   help="with --wait: how long to wait (default: the TrustDomain's propagation delay + 60s)")
    p.set_defaults(func=_run("rotate"))


def _run(verb: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from meshtls.cli import ca_ops, cluster_ops

        return int(cluster_ops.with_cluster(args, getattr(ca_ops, verb)))

    run.__name__ = f"ca_{verb}"
    return run
