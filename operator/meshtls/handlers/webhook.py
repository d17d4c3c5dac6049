"""The injection webhook: an HTTPS admission endpoint, its serving certificate, and its configuration.

Served by meshtls itself (aiohttp, already under kopf) rather than kopf's webhook server, so that selectors,
failurePolicy and malformed requests are fully ours: the API server only calls for opted-in pods outside
kube-system and the operator's namespace, and a bad request gets a 400 with a reason, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from meshtls.api.constants import LABEL_INJECT_NAMESPACE, LABEL_INJECT_POD, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.objects import SecretSnapshot
from meshtls.handlers.settings import OperatorOptions
from meshtls.handlers.targets import TargetIndex
from meshtls.kube import Kube
from meshtls.lifecycle.clock import Clock
from meshtls.pki import PKIError, generate_ca, load_ca, load_certificates
from meshtls.pki.serving import issue_serving_certificate
from meshtls.sidecar.admission import review_pod_admission
from meshtls.sidecar.target import InjectionOptions

log = logging.getLogger("meshtls.webhook")
CONFIGURATION_NAME = "meshtls-injector"
TLS_SECRET = "meshtls-webhook-tls"
PATH = "/inject"
SERVING_TTL = dt.timedelta(days=90)
RENEW_WITHIN = dt.timedelta(days=30)
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


def webhook_definitions(options: OperatorOptions, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Two webhooks, one per opt-in path (namespace label, pod label): selectors are ANDed within one."""
    if options.webhook_service:
        client_config: dict[str, Any] = {"service": {"name": options.webhook_service,
                                                     "namespace": options.operator_namespace, "path": PATH,
                                                     "port": 443}}
    else:
        client_config = {"url": f"https://{options.webhook_host}:{options.webhook_port}{PATH}"}
    client_config["caBundle"] = base64.b64encode(ca_bundle).decode()
    excluded = {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": [*SYSTEM_NAMESPACES, options.operator_namespace]}
    common = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "timeoutSeconds": 5,
        "failurePolicy": options.webhook_failure_policy,
        "reinvocationPolicy": "Never",
        "matchPolicy": "Equivalent",
        "clientConfig": client_config,
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
                   "scope": "Namespaced"}],
    }
    return [
        {**common, "name": "namespace.inject.meshtls.dev",
         "namespaceSelector": {"matchExpressions": [
             excluded, {"key": LABEL_INJECT_NAMESPACE, "operator": "In", "values": ["enabled"]}]},
         "objectSelector": {"matchExpressions": [
             {"key": LABEL_INJECT_POD, "operator": "NotIn", "values": ["false"]}]}},
        {**common, "name": "pod.inject.meshtls.dev",
         "namespaceSelector": {"matchExpressions": [
             excluded, {"key": LABEL_INJECT_NAMESPACE, "operator": "NotIn", "values": ["enabled"]}]},
         "objectSelector": {"matchLabels": {LABEL_INJECT_POD: "true"}}},
    ]


async def ensure_serving_certificate(kube: Kube, clock: Clock, options: OperatorOptions) -> tuple[bytes, bytes, bytes]:
    """(cert chain, key, CA) for the webhook, kept in a Secret so the caBundle survives restarts."""
    now = clock.now()
    if options.webhook_service:
        svc, ns = options.webhook_service, options.operator_namespace
        dns, ips = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"], []
    else:
        dns, ips = ["localhost"], [options.webhook_host] if _is_ip(options.webhook_host) else []
        if not ips:
            dns = [options.webhook_host, *dns]
    current = await kube.run(kube.read_secret, options.operator_namespace, TLS_SECRET)
    if current.exists and _still_good(current, now, dns, ips):
        return current.data["tls.crt"], current.data["tls.key"], current.data["ca.crt"]
    try:
        ca = load_ca(current.data["ca.crt"], current.data["ca.key"], now) if current.exists else None
    except (PKIError, KeyError):
        ca = None
    if ca is None or ca.not_after - now < SERVING_TTL:
        ca = generate_ca("meshtls-webhook", now, validity=dt.timedelta(days=3650), common_name="meshtls webhook CA")
    serving = issue_serving_certificate(ca, dns, ips, now, SERVING_TTL)
    data = {"tls.crt": serving.cert_chain_pem, "tls.key": serving.key_pem, "ca.crt": ca.certificate_pem(),
            "ca.key": ca.key_pem()}
    await kube.run(kube.write_opaque_secret, options.operator_namespace, TLS_SECRET, data,
                   {LABEL_MANAGED_BY: MANAGED_BY}, current)
    return serving.cert_chain_pem, serving.key_pem, ca.certificate_pem()


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _still_good(secret: SecretSnapshot, now: dt.datetime, dns: list[str], ips: list[str]) -> bool:
    from cryptography import x509

    try:
        cert = load_certificates(secret.data["tls.crt"])[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (KeyError, PKIError, x509.ExtensionNotFound):
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return (cert.not_valid_after_utc - now > RENEW_WITHIN and set(dns) <= have_dns and set(ips) <= have_ips
            and "ca.crt" in secret.data and "tls.key" in secret.data)


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


class InjectionWebhook:
    def __init__(self, kube: Kube, index: TargetIndex, options: OperatorOptions,
                 injection: InjectionOptions) -> None:
        self.kube = kube
        self.index = index
        self.options = options
        self.injection = injection
        self.runner: web.AppRunner | None = None
        self._events: set[asyncio.Task[None]] = set()

    async def start(self, clock: Clock) -> None:
        chain, key, ca = await ensure_serving_certificate(self.kube, clock, self.options)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:  # ssl loads key pairs from files only
            cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert_file.write_bytes(chain)
            key_file.write_bytes(key)
            key_file.chmod(0o600)
            context.load_cert_chain(cert_file, key_file)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(PATH, self.handle)
        app.router.add_get("/healthz", _healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        bind = "0.0.0.0" if self.options.webhook_service else self.options.webhook_host
        await web.TCPSite(self.runner, bind, self.options.webhook_port, ssl_context=context).start()
        await self.kube.run(self.kube.apply_mutating_webhook_configuration, CONFIGURATION_NAME,
                            webhook_definitions(self.options, ca), {LABEL_MANAGED_BY: MANAGED_BY})
        log.info("injection webhook serving on %s:%d (failurePolicy %s)", bind, self.options.webhook_port,
                 self.options.webhook_failure_policy)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        outcome = review_pod_admission(body, self.index.lookup, self.injection)
        if outcome.event is not None:
            task = asyncio.create_task(self._post_event(body, *outcome.event))
            self._events.add(task)
            task.add_done_callback(self._events.discard)
        return web.json_response(outcome.response, status=outcome.http_status)

    async def _post_event(self, body: bytes, reason: str, message: str) -> None:
        import json

        request = json.loads(body).get("request") or {}  # well-formed: the review produced an Event
        pod = (request.get("object") or {}).get("metadata") or {}
        namespace = request.get("namespace") or pod.get("namespace") or "default"
        name = request.get("name") or pod.get("name") or pod.get("generateName") or "pod"
        try:
            await self.kube.run(self.kube.post_event, {"apiVersion": "v1", "kind": "Pod", "name": name,
                                                       "namespace": namespace}, "Warning", reason, message,
                                "meshtls-injector")
        except Exception as exc:
            log.warning("could not post Event %s in %s: %s", reason, namespace, exc)
