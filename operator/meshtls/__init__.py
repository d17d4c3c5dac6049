"""meshtls: short-lived SPIFFE mTLS identities for Kubernetes workloads."""

__version__ = "0.1.0"
