"""meshtls benchmarks against the local real control plane: `python -m bench.run` (or `make bench`).

Sections: issuance (vs a minimal client, the floor), steady state, revocation storm, data plane (vs nginx).
Results (JSON, report.md, PNG plots) go under bench/results/<timestamp>/.
"""
