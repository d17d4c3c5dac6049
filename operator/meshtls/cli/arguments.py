"""The cluster commands' arguments: `meshtls status | renew | revoke | inspect | check | watch` and `meshtls ca
rotate | status` (also `kubectl meshtls ...`).

Declarations only: a command's work is in `cli.commands.<command>`, imported when it runs, so that `meshtls pki ...`
and `meshtls --help` never pay for importing the Kubernetes client.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any

from meshtls.api.constants import DEFAULT_BUNDLE_CONFIGMAP
from meshtls.api.reasons import WATCHED_REASONS
from meshtls.cli.errors import Parser
from meshtls.pki.crl import RevocationReason

OUTPUT_FORMATS = ("table", "json", "yaml")


def _cluster_flags() -> Parser:
    cluster = Parser(add_help=False)
    group = cluster.add_argument_group("cluster")
    group.add_argument("--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    group.add_argument("--context", default=None, help="kubeconfig context (default: the current context)")
    return cluster


def _output_flags() -> Parser:
    output = Parser(add_help=False)
    output.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="table (default), json, yaml")
    return output


def add_cluster_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    cluster, output = _cluster_flags(), _output_flags()

    p = sub.add_parser("status", parents=[cluster, output], help="identities: serial, expiry, renewal, rotations",
                       description="A table of WorkloadIdentities; with NAME, its conditions and recent Events.")
    _scope(p)
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--events", type=int, default=20, metavar="N", help="with NAME: show the last N Events (20)")
    p.set_defaults(func=_run("status", "status"))

    p = sub.add_parser("renew", parents=[cluster, output], help="re-issue now (renew annotation) and wait for it",
                       description="Ask the operator to re-issue NAME (or --all) now and wait for the new serial.")
    _scope(p)
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every identity in the namespace (with -A: in the cluster)")
    _wait_flags(p)
    p.set_defaults(func=_run("renew", "renew"))

    p = sub.add_parser("revoke", parents=[cluster, output], help="revoke the current certificate and re-issue",
                       description="Put NAME's current serial on its trust domain's CRL and re-issue; waits until "
                                   "the namespace's bundle carries the CRL and a new serial is issued.")
    p.add_argument("-n", "--namespace", default=None, help="the identity's namespace (default: the context's)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reason", required=True, help=", ".join(r.value for r in RevocationReason))
    _wait_flags(p)
    p.set_defaults(func=_run("revoke", "revoke"))

    p = sub.add_parser("inspect", parents=[cluster, output],
                       help="a Secret's or file's chain, SPIFFE ID, validity, and whether the bundle accepts it",
                       description="meshtls inspect secret NAME [-n NS]  |  meshtls inspect FILE [-n NS]. "
                                   "A FILE is checked against namespace NS's trust bundle and CRL when -n is given "
                                   "(offline otherwise).")
    p.add_argument("target", metavar="secret|FILE")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-n", "--namespace", default=None, help="the Secret's namespace; for a FILE, whose bundle")
    p.add_argument("--bundle", default=None, metavar="CONFIGMAP",
                   help=f"bundle ConfigMap (default: the trust domain's, usually {DEFAULT_BUNDLE_CONFIGMAP})")
    p.set_defaults(func=_run("inspect", "inspect", connect=False))

    p = sub.add_parser("check", parents=[cluster, output], help="is meshtls healthy here? exit status 1 when not",
                       description="One line per check; exit status 1 when any fails.")
    p.add_argument("--operator-namespace", default=os.environ.get("MESHTLS_NAMESPACE", "meshtls-system"),
                   help="where the operator and its CA Secrets live (default $MESHTLS_NAMESPACE or meshtls-system)")
    p.add_argument("--operator-url", default=None, metavar="URL",
                   help="probe the operator's liveness endpoint (e.g. http://127.0.0.1:8081/healthz) instead of "
                        "reading its heartbeat Lease meshtls-operator")
    p.add_argument("--peering", default="meshtls",
                   help="kopf peering to look at when there is no heartbeat Lease (default meshtls)")
    p.add_argument("-n", "--namespace", default=None,
                   help="check only this namespace's identities and bundles (default: all)")
    p.set_defaults(func=_run("check", "check"))

    p = sub.add_parser("watch", parents=[cluster, output], help="stream Issued/Rotated/Revoked/... Events live",
                       description="A live stream of meshtls Events, one line each (-o json: JSON lines). "
                                   "Ctrl-C ends it.")
    _scope(p)
    p.add_argument("--reason", action="append", default=None,
                   help=f"only this reason (repeatable; default {', '.join(WATCHED_REASONS)})")
    p.set_defaults(func=_run("watch", "watch"))


def _scope(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's, else default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", dest="wait", action="store_false", help="set the annotation and return")
    p.add_argument("--timeout", default="60s", help="how long to wait for the operator (default 60s)")


def add_ca_commands(sub: argparse._SubParsersAction[Parser]) -> None:
    cluster, output = _cluster_flags(), _output_flags()

    ca = sub.add_parser("ca", help="a TrustDomain's CA: rotate it, show it",
                        description="The CAs of the TrustDomains: `ca status` shows them and their rotation phase, "
                                    "`ca rotate` starts a rotation now.")
    verbs = ca.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)

    p = verbs.add_parser("status", parents=[cluster, output], help="CA fingerprint, expiry, rotation phase, CRL",
                         description="A table of TrustDomains: CA fingerprint and notAfter, rotation phase and since "
                                     "when, next/previous CA, when the old CA retires, CRL number and entries, "
                                     "Ready. With TRUSTDOMAIN: that one, and its conditions.")
    p.add_argument("name", nargs="?", metavar="TRUSTDOMAIN")
    p.set_defaults(func=_run("ca", "status"))

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
    p.set_defaults(func=_run("ca", "rotate"))


def _run(module: str, verb: str, connect: bool = True) -> Any:
    """The command's function `verb` in `meshtls.cli.commands.<module>`, imported only when it runs."""
    def run(args: argparse.Namespace) -> int:
        from meshtls.cli.commands.cluster import with_cluster

        fn = getattr(importlib.import_module(f"meshtls.cli.commands.{module}"), verb)
        return int(with_cluster(args, fn) if connect else fn(args))

    run.__name__ = verb if module == verb else f"{module}_{verb}"
    return run
