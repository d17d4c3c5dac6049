"""The controller: reconciling identities and trust domains at run time, the renewal scheduler and metrics.
No kopf here; the Kubernetes API only through meshtls.kube."""
