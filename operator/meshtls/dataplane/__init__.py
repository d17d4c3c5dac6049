"""The contract between the operator and the pod: what the operator writes (the sidecar config schema, the mounted
volumes' layout) and the proxy reads. Imports nothing but `pki`, so both sides can depend on it and not on each other.

(The config schema, today `meshtls.sidecar.config`, moves here in the second phase of issue #14.)
"""
