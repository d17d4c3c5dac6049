"""What the unit tests (tests/), the e2e suites (e2e/) and the benchmarks (bench/) share: the kubelet's part for
sidecar volumes and processes (`kubelet`), threads that run beside a test (`threads`), an in-process mesh of
proxies (`proxymesh`), tools the machine must have (`tools`), and an in-memory Kubernetes API for controller
unit tests (`fakekube`; never for e2e). Importable from the repository root (where pytest and `python -m bench...`
run)."""
