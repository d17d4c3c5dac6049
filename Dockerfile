# syntax=docker/dockerfile:1
# One image, two entry points: `meshtls` (the operator and the CLI) and `meshtls-proxy` (the injected sidecar).
#   docker build -t meshtls:0.1.0 .
# The chart runs `meshtls operator ...`; the webhook injects this same image with `meshtls-proxy --config ...`.
# Both run as the non-root user 65532 on a read-only root filesystem (nothing is written outside mounted volumes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the meshtls wheel, then a virtualenv with it and its dependencies -----------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/meshtls \
 && /opt/meshtls/bin/pip install /wheels/meshtls-*.whl \
 && /opt/meshtls/bin/pip uninstall --yes pip \
 && /opt/meshtls/bin/meshtls --version \
 && /opt/meshtls/bin/meshtls-proxy --help > /dev/null

# --- runtime: the virtualenv on the same slim Python, no compiler, no pip ---------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meshtls" \
      org.opencontainers.image.description="Short-lived SPIFFE mTLS identities for Kubernetes workloads" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/meshtls /opt/meshtls
ENV PATH=/opt/meshtls/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# 65532: the conventional "nonroot" user (the chart's pod securityContext and the injected sidecar use it too).
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT []
CMD ["meshtls", "--help"]
