"""meshtls-proxy, the L4 mTLS sidecar that runs in the pod. It reads the files the operator mounts
(`meshtls.dataplane`) and imports nothing of the operator's side: no kopf, no Kubernetes client, no webhook code.

main (command line) -> server (one sidecar: listeners, reload, revocation cuts) -> routes (per-connection setup)
-> splice (the two sockets of a connection); authz (who the peer is, may it pass), errors (rejection reasons),
volumes + reloader (mounted files -> TLS contexts), admin (probes and metrics).
"""
