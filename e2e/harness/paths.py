"""Where the harness keeps its build cache and its cluster state (both outside the repository)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the cache: built binaries, their build modules and logs. Env MESHTLS_CACHE overrides."""
    if env := os.environ.get("MESHTLS_CACHE"):
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().absolute() / "meshtls"


def state_dir() -> Path:
    """State of the running cluster: certificates, kubeconfigs, etcd data, logs.

    Env MESHTLS_CLUSTER_DIR overrides."""
    if env := os.environ.get("MESHTLS_CLUSTER_DIR"):
        return Path(env).expanduser().absolute()
    return cache_dir() / "cluster"
