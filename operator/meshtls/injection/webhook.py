"""The injection webhook: an HTTPS admission endpoint, its serving certificate, and its configuration.

Served by meshtls itself (aiohttp, already under kopf) rather than kopf's webhook server, so that selectors,
failurePolicy and malformed requests are fully ours: the API server only calls for opted-in pods outside
kube-system and the operator's namespace, and a bad request gets a 400 with a reason, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import json
import logging
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from meshtls.api.constants import (
    GROUP,
    LABEL_INJECT_NAMESPACE,
    LABEL_INJECT_POD,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    VERSION,
    WORKLOAD_IDENTITIES,
)
from meshtls.api.model import DataPlane, TrustDomainSpec, parse_trust_domain, parse_workload_identity, resolve_identity
from meshtls.api.names import WEBHOOK_CONFIGURATION, WEBHOOK_TLS_SECRET
from meshtls.api.objects import SecretSnapshot
from meshtls.injection.admission import Lookup, review_pod_admission
from meshtls.injection.identity_admission import FINALIZER_PATH, review_identity_admission
from meshtls.injection.render import injection_target
from meshtls.injection.target import InjectionOptions, InjectionTarget
from meshtls.injection.targets import TargetIndex
from meshtls.kube import Kube
from meshtls.pki import PKIError, generate_ca, load_ca, load_certificates
from meshtls.pki.serving import issue_serving_certificate
from meshtls.policy.clock import Clock

log = logging.getLogger("meshtls.webhook")
PATH = "/inject"
SERVING_TTL = dt.timedelta(days=90)
RENEW_WITHIN = dt.timedelta(days=30)
CERTIFICATE_CHECK = dt.timedelta(hours=12)
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


class WebhookSettings(Protocol):
    """What the webhook reads of the operator's settings (meshtls.operator.settings.OperatorOptions has them)."""

    operator_namespace: str
    webhook_port: int
    webhook_host: str
    webhook_service: str | None
    webhook_failure_policy: str
    default_data_plane: str
    namespaces: list[str]  # empty: every namespace


def webhook_definitions(options: WebhookSettings, ca_bundle: bytes) -> list[dict[str, Any]]:
    """Two webhooks for pods, one per opt-in path (namespace label, pod label): selectors are ANDed within one.
    A third sets meshtls's finalizer on every WorkloadIdentity created in the namespaces served (one PATCH less per
    identity); it is always failurePolicy Ignore: while it is down, the operator adds the finalizer itself."""

    def client_config(path: str) -> dict[str, Any]:
        if options.webhook_service:
            config: dict[str, Any] = {"service": {"name": options.webhook_service,
                                                  "namespace": options.operator_namespace, "path": path, "port": 443}}
        else:
            config = {"url": f"https://{options.webhook_host}:{options.webhook_port}{path}"}
        config["caBundle"] = base64.b64encode(ca_bundle).decode()
        return config

    excluded = {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": [*SYSTEM_NAMESPACES, options.operator_namespace]}
    common = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "timeoutSeconds": 5,
        "failurePolicy": options.webhook_failure_policy,
        "reinvocationPolicy": "Never",
        "matchPolicy": "Equivalent",
        "clientConfig": client_config(PATH),
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
        {**common, "name": "finalizer.identities.meshtls.dev", "failurePolicy": "Ignore",
         "clientConfig": client_config(FINALIZER_PATH),
         "rules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "operations": ["CREATE"],
                    "resources": [WORKLOAD_IDENTITIES], "scope": "Namespaced"}],
         # only where this operator serves identities: elsewhere nobody would ever remove the finalizer
         "namespaceSelector": {"matchExpressions": [
             {"key": "kubernetes.io/metadata.name", "operator": "In", "values": sorted(set(options.namespaces))}]}
         if options.namespaces else {},
         "objectSelector": {}},
    ]


async def ensure_serving_certificate(kube: Kube, clock: Clock, options: WebhookSettings) -> tuple[bytes, bytes, bytes]:
    """(cert chain, key, CA) for the webhook, kept in a Secret so the caBundle survives restarts."""
    now = clock.now()
    if options.webhook_service:
        svc, ns = options.webhook_service, options.operator_namespace
        dns, ips = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"], []
    else:
        dns, ips = ["localhost"], [options.webhook_host] if _is_ip(options.webhook_host) else []
        if not ips:
            dns = [options.webhook_host, *dns]
    current = await kube.run(kube.read_secret, options.operator_namespace, WEBHOOK_TLS_SECRET)
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
    await kube.run(kube.write_opaque_secret, options.operator_namespace, WEBHOOK_TLS_SECRET, data,
                   {LABEL_MANAGED_BY: MANAGED_BY}, current)
    return serving.cert_chain_pem, serving.key_pem, ca.certificate_pem()


def _load_pair(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads key pairs from files only
        cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_file.write_bytes(chain)
        key_file.write_bytes(key)
        key_file.chmod(0o600)
        context.load_cert_chain(cert_file, key_file)


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


def _pod_service_account(body: bytes) -> tuple[str, str] | None:
    """(namespace, serviceAccount) of the pod in a review, or None when the body is not one (review says why)."""
    try:
        request = json.loads(body).get("request") or {}
        pod = request.get("object") or {}
        namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace")
        sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    except (ValueError, AttributeError, TypeError):
        return None
    return (namespace, sa) if isinstance(namespace, str) and isinstance(sa, str) else None


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


class InjectionWebhook:
    def __init__(self, kube: Kube, index: TargetIndex, options: WebhookSettings,
                 injection: InjectionOptions, paused: Callable[[], bool] = lambda: False) -> None:
        self.kube = kube
        self.index = index
        self.options = options
        self.injection = injection
        self.paused = paused  # a standing-by replica's index is stale: ask the API
        self.runner: web.AppRunner | None = None
        self._events: set[asyncio.Task[None]] = set()

    async def start(self, clock: Clock) -> None:
        chain, key, ca = await ensure_serving_certificate(self.kube, clock, self.options)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _load_pair(self.context, chain, key)
        context = self.context
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post(PATH, self.handle)
        app.router.add_post(FINALIZER_PATH, self.handle_identity)
        app.router.add_get("/healthz", _healthz)
        bind = "0.0.0.0" if self.options.webhook_service else self.options.webhook_host
        # Served from a thread and event loop of its own: the API server waits on every admission (each identity
        # created, each opted-in pod), and on the operator's loop, busy issuing, it waited ~190 ms per call.
        self.loop = asyncio.new_event_loop()
        serving: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def listen() -> None:
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, bind, self.options.webhook_port, ssl_context=context).start()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(listen())
            except BaseException as exc:
                serving.set_exception(exc)
                return
            serving.set_result(None)
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, name="webhook", daemon=True)
        self.thread.start()
        await asyncio.wrap_future(serving)
        await self._apply_configuration(ca)
        self.ca = ca
        self.renewer = asyncio.create_task(self._keep_certificate_fresh(clock))
        log.info("injection webhook serving on %s:%d (failurePolicy %s)", bind, self.options.webhook_port,
                 self.options.webhook_failure_policy)

    async def _apply_configuration(self, ca: bytes) -> None:
        try:
            await self.kube.run(self.kube.apply_mutating_webhook_configuration, WEBHOOK_CONFIGURATION,
                                webhook_definitions(self.options, ca), {LABEL_MANAGED_BY: MANAGED_BY})
        except Exception as exc:  # keep serving: the configuration may be fixed by its owner (helm upgrade)
            log.error("could not write MutatingWebhookConfiguration %s (%s): pods will not be injected until it "
                      "exists with this caBundle; with the Helm chart, run `helm upgrade` to recreate it",
                      WEBHOOK_CONFIGURATION, exc)

    async def _keep_certificate_fresh(self, clock: Clock) -> None:
        """The serving certificate lives 90 days; look twice a day, renew within 30 days of expiry."""
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK.total_seconds())
            try:
                chain, key, ca = await ensure_serving_certificate(self.kube, clock, self.options)
                _load_pair(self.context, chain, key)  # new handshakes use it; the listener stays up
                if ca != self.ca:
                    self.ca = ca
                await self._apply_configuration(ca)
            except Exception as exc:
                log.warning("checking the webhook's serving certificate failed: %s", exc)

    async def stop(self) -> None:
        if getattr(self, "renewer", None) is not None:
            self.renewer.cancel()
        if self.runner is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop))
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self.thread.join, 5)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        lookup: Lookup = self.index.lookup
        wanted = _pod_service_account(body)
        if wanted is not None and (self.paused() or not self.index.lookup(*wanted)):
            # A miss in memory: this replica may be a paused peer (it watches nothing) or just started.
            # Ask the API rather than admit the pod without its sidecar.
            try:
                found = await self._targets_from_api(*wanted)
            except Exception as exc:
                log.warning("identity lookup for %s/%s through the API failed: %s", *wanted, exc)
                found = []
            if found:
                def from_api(namespace: str, sa: str) -> list[InjectionTarget]:
                    return found if (namespace, sa) == wanted else self.index.lookup(namespace, sa)

                lookup = from_api
        outcome = review_pod_admission(body, lookup, self.injection)
        if outcome.event is not None:
            task = asyncio.create_task(self._post_event(body, *outcome.event))
            self._events.add(task)
            task.add_done_callback(self._events.discard)
        return web.json_response(outcome.response, status=outcome.http_status)

    async def handle_identity(self, request: web.Request) -> web.Response:
        outcome = review_identity_admission(await request.read())
        return web.json_response(outcome.response, status=outcome.http_status)

    async def _targets_from_api(self, namespace: str, service_account: str) -> list[InjectionTarget]:
        """Targets for (namespace, ServiceAccount) from the identities Ready under the trust domain their status
        names, parsed and resolved as the acting replica did."""
        out = []
        for body in await self.kube.run(self.kube.list_workload_identities, namespace):
            status = body.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
            try:
                spec = parse_workload_identity(body)
                if spec.service_account != service_account or not ready:
                    continue
                td_name = str(status.get("trustDomain") or "")
                td_body = await self.kube.run(self.kube.get_trust_domain, td_name)
                # deleted since it was Ready: its pods keep the identity's Secret and the default bundle
                td = parse_trust_domain(td_body) if td_body else TrustDomainSpec(name=td_name)
                identity = resolve_identity(spec, td, DataPlane(self.options.default_data_plane))
                if not identity.has_sidecar:
                    continue
            except PKIError as exc:  # not Ready for long: the acting replica reports it on the identity
                log.debug("identity %s/%s is not injectable: %s", namespace, (body.get("metadata") or {}).get("name"),
                          exc)
                continue
            out.append(injection_target(identity, td.bundle_configmap))
        return out

    async def _post_event(self, body: bytes, reason: str, message: str) -> None:
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
