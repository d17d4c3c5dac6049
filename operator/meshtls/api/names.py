"""The names meshtls gives the objects it writes, and the defaults behind them: one place, imported by the
operator, the webhook and the CLI alike (a copy in the CLI would drift from what the operator writes)."""

from __future__ import annotations

import datetime as dt

from meshtls import __version__

MAX_OBJECT_NAME = 253  # a Secret's or ConfigMap's name (a DNS subdomain)
SECRET_SUFFIX = "-mtls"  # an identity's Secret, unless spec.secretName names another
SIDECAR_CONFIG_SUFFIX = "-meshtls-proxy"  # an identity's rendered sidecar config
DEFAULT_SIDECAR_IMAGE = f"meshtls:{__version__}"  # the chart's default too: image.repository:.Chart.AppVersion

# The injector (one per cluster): its MutatingWebhookConfiguration and its serving certificate's Secret.
WEBHOOK_CONFIGURATION = "meshtls-injector"
WEBHOOK_TLS_SECRET = "meshtls-webhook-tls"


def default_secret_name(identity_name: str) -> str:
    """The Secret an identity's certificate goes to when spec.secretName is not set."""
    return f"{identity_name}{SECRET_SUFFIX}"


def sidecar_configmap_name(identity_name: str) -> str:
    """The ConfigMap holding one identity's rendered proxy.yaml."""
    return f"{identity_name}{SIDECAR_CONFIG_SUFFIX}"[:MAX_OBJECT_NAME]


def state_secret_name(trust_domain: str) -> str:
    """The Secret in the operator's namespace holding a trust domain's CAs and revocations."""
    return f"meshtls-ca-{trust_domain.replace('_', '-')}"[:MAX_OBJECT_NAME].rstrip(".-")


def iso(t: dt.datetime) -> str:
    """A timestamp as status fields, annotations and the CLI write it: UTC, seconds, `Z`."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
