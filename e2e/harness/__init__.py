"""A local Kubernetes control plane built from the Go module proxy, for the e2e tests and the demo.

from e2e.harness import Cluster
cluster = Cluster.start()          # reuse, use $KUBECONFIG (MESHTLS_USE_EXISTING_CLUSTER=1), or build + start
cluster.kubectl("get", "nodes")    # the cached kubectl v1.34.1 against it
cluster.stop()                     # only stops what this object started
"""

from .build import COMPONENTS, BuildError, build_all
from .cluster import Cluster, HarnessError, KubectlError
from .processes import ComponentError

__all__ = [
    "COMPONENTS",
    "BuildError",
    "Cluster",
    "ComponentError",
    "HarnessError",
    "KubectlError",
    "build_all",
]
