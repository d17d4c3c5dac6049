"""One module per command: what it reads and writes (through `meshtls.kube`) and what it prints (via `cli.views`)."""
