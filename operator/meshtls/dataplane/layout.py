"""Where the injected sidecar finds its files: the mount points and the file names inside each volume.

The webhook writes the pod's volumes and mounts from these names; the proxy reads the same names. The kubelet
projects a Secret or ConfigMap as `..data` -> a timestamped directory, with the visible files symlinked through it.
"""

from __future__ import annotations

# mount points in the sidecar container
IDENTITY_DIR = "/var/run/meshtls/identity"  # the identity Secret
BUNDLE_DIR = "/var/run/meshtls/bundle"  # the trust bundle ConfigMap
CONFIG_DIR = "/etc/meshtls"  # the rendered sidecar config
CONFIG_FILE = "proxy.yaml"
# the SPIFFE Workload API (docs/workload-api.md): a per-pod emptyDir shared by the sidecar and the app containers
WORKLOAD_API_DIR = "/var/run/meshtls/workload-api"
WORKLOAD_API_SOCKET = "agent.sock"
SPIFFE_ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"  # the SPIFFE Workload Endpoint spec's variable

DATA_LINK = "..data"  # the kubelet's atomic-update symlink in a projected volume

# the identity Secret (kubernetes.io/tls keys plus the bundle it was issued under)
CERT_FILE = "tls.crt"  # leaf then chain
KEY_FILE = "tls.key"
# the trust bundle ConfigMap
BUNDLE_FILE = "ca.crt"  # every root this workload trusts
CRL_FILE = "crl.pem"  # the CRLs of every issuer in the bundle

IDENTITY_FILES = (CERT_FILE, KEY_FILE)
BUNDLE_FILES = (BUNDLE_FILE, CRL_FILE)
