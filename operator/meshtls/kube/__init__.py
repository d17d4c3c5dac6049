"""The only code that talks to the Kubernetes API."""

from meshtls.kube.client import Conflict, Kube, NotFound, connect, use_kubeconfig

__all__ = ["Conflict", "Kube", "NotFound", "connect", "use_kubeconfig"]
