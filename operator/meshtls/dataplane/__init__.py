"""The contract between the operator and the pod: what the operator writes (the sidecar config schema in `config`,
the mounted volumes' layout in `layout`) and the proxy reads. Imports nothing but `pki`, so both sides can depend on it
and not on each other.
"""
