"""Start the operator: kopf's engine with meshtls's handlers and options."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys

import kopf

from meshtls.kube import use_kubeconfig
from meshtls.operator.settings import OPTIONS, OperatorOptions


def _few_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own heap arena (up to 8 per core) and keeps each one's high-water
    mark: the API executor's, the watches' and the webhook's threads each hold a fragmented one after a burst. Two
    arenas bound that (an explicit MALLOC_ARENA_MAX wins); before any thread starts."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: its allocator has its own rules
        pass


# The admission webhook's thread waits for the GIL behind the event loop and the API threads: at CPython's default
# 5 ms switch interval an admission, which needs it several times, waited ~100 ms on a busy operator.
GIL_SWITCH_INTERVAL = 0.0005  # seconds


def run_operator(options: OperatorOptions, verbose: bool = False) -> None:
    OPTIONS.__dict__.update(options.__dict__)
    _few_malloc_arenas()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
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
