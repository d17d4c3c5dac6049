"""`meshtls`: the command line. Each command group lives in its own module; this file only wires them."""

from __future__ import annotations

import sys

from meshtls import __version__
from meshtls.cli.arguments import add_ca_commands, add_cluster_commands
from meshtls.cli.commands.operator import add_operator_command
from meshtls.cli.commands.pki import add_pki_commands
from meshtls.cli.errors import CommandFailed, Parser, UsageError
from meshtls.pki import PKIError


def build_parser() -> Parser:
    parser = Parser(prog="meshtls", description="Short-lived SPIFFE mTLS identities for Kubernetes workloads.")
    parser.add_argument("--version", action="version", version=f"meshtls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_pki_commands(sub)
    add_operator_command(sub)
    add_cluster_commands(sub)
    add_ca_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, PKIError) as exc:
        print(f"meshtls: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"meshtls: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
