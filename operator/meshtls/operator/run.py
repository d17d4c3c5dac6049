"""Start the operator: kopf's engine with meshtls's handlers and options."""

from __future__ import annotations

import asyncio
import logging

import kopf

from meshtls.kube import use_kubeconfig
from meshtls.operator.settings import OPTIONS, OperatorOptions


def run_operator(options: OperatorOptions, verbose: bool = False) -> None:
    OPTIONS.__dict__.update(options.__dict__)
    if options.kubeconfig:  # before kopf logs in
        use_kubeconfig(options.kubeconfig)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    import meshtls.operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose)
    asyncio.run(kopf.operator(
        clusterwide=not options.namespaces,
        namespaces=options.namespaces or (),
        standalone=options.peering is None,
        priority=options.priority,
        peering_name=options.peering,
        liveness_endpoint=f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None,
    ))
