"""The SPIFFE Workload API (X.509 profile) on a Unix socket in the pod, from the sidecar's mounted identity and bundle.

What a SPIFFE-aware app (go-spiffe, py-spiffe, java-spiffe, Envoy's SDS from a SPIRE agent) asks of a SPIRE agent,
served from the files meshtls-proxy already reloads (docs/workload-api.md):

- FetchX509SVID streams this pod's X509-SVID (chain, PKCS#8 key), its trust domain's bundle, the federated bundles
  and the CRLs, again whenever one of them changes (rotation, CA rotation step, federation change, CRL update);
- FetchX509Bundles streams the bundles and CRLs;
- the JWT profile answers Unimplemented: meshtls has no JWT authority;
- a call without the `workload.spiffe.io: true` metadata gets InvalidArgument (SPIFFE Workload Endpoint, section 6).

What is served is decided by `decide` (pure): only the pod's own identity, only while its certificate matches its key,
is within its validity, chains to its trust domain's bundle and is not on a CRL of that bundle, and only while the
Secret is still mounted. Otherwise the spec's error: PermissionDenied when the pod is no longer entitled (the Secret
is gone, the certificate was revoked or names another identity: the client must stop using what it had), Unavailable
while nothing usable is loaded (starting, expired and not yet renewed): retry with a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from meshtls.dataplane.layout import CERT_FILE, KEY_FILE
from meshtls.pki.keys import public_keys_match
from meshtls.pki.spiffe import SCHEME
from meshtls.pki.verify import verify_svid
from meshtls.proxy import workload_wire as wire
from meshtls.proxy.admin import PREFIX
from meshtls.proxy.volumes import Bundle, Identity

if TYPE_CHECKING:
    import grpc
    import grpc.aio

log = logging.getLogger("meshtls.proxy.workload_api")

SECURITY_HEADER = ("workload.spiffe.io", "true")  # key and value, both case-sensitive
DEFAULT_SOCKET_MODE = 0o666
# Why a message was pushed, in the order a change is named when several happen at once.
REASONS = ("initial", "rotation", "ca_bundle", "federation", "crl")
RPCS = (wire.FETCH_X509_SVID, wire.FETCH_X509_BUNDLES)
NO_JWT = ("meshtls serves X509-SVIDs only: it has no JWT authority, so the JWT-SVID profile (FetchJWTSVID, "
          "FetchJWTBundles, ValidateJWTSVID) is not implemented")


# --- what to serve: pure ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """The spec's answer when there is nothing right to serve: a gRPC status code name and what is wrong."""

    code: str  # "PERMISSION_DENIED" or "UNAVAILABLE" (grpc.StatusCode member names)
    message: str


@dataclass(frozen=True)
class TrustBundles:
    """The roots per trust domain and the CRLs: what FetchX509Bundles sends, and the bundle part of an SVID message."""

    trust_domain: str  # the pod's own
    bundles: dict[str, bytes]  # "spiffe://<td>" -> concatenated DER roots, the pod's own trust domain included
    crls: tuple[bytes, ...]

    @property
    def own(self) -> bytes:
        return self.bundles.get(SCHEME + self.trust_domain, b"")

    @property
    def federated(self) -> dict[str, bytes]:
        return {k: v for k, v in self.bundles.items() if k != SCHEME + self.trust_domain}

    def response(self) -> bytes:
        return wire.x509_bundles_response(self.bundles, self.crls)


@dataclass(frozen=True)
class Material:
    """The pod's X509-SVID with its bundles: one consistent view, what FetchX509SVID sends."""

    spiffe_id: str
    serial: str
    chain_der: bytes
    key_der: bytes
    trust: TrustBundles

    def response(self) -> bytes:
        svid = wire.X509Svid(self.spiffe_id, self.chain_der, self.key_der, self.trust.own)
        return wire.x509_svid_response([svid], self.trust.crls, self.trust.federated)


def change_reason(old: object, new: Material | TrustBundles) -> str | None:
    """What changed between two views of the same kind (None: nothing a client sees)."""
    if type(old) is not type(new):
        return "initial"
    if isinstance(old, Material) and isinstance(new, Material):
        if (old.chain_der, old.key_der) != (new.chain_der, new.key_der):
            return "rotation"
        old, new = old.trust, new.trust
    assert isinstance(old, TrustBundles) and isinstance(new, TrustBundles)
    if old.own != new.own:
        return "ca_bundle"
    if old.federated != new.federated:
        return "federation"
    if old.crls != new.crls:
        return "crl"
    return None


def _trust_domain_of_root(root: x509.Certificate) -> str | None:
    """The trust domain a CA certificate names in its URI SAN (meshtls's and SPIRE's CAs carry spiffe://<td>)."""
    try:
        sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SCHEME):
            return uri[len(SCHEME):].split("/", 1)[0] or None
    return None


def group_roots(roots: tuple[x509.Certificate, ...], own_trust_domain: str) -> dict[str, bytes]:
    """The bundle ConfigMap's roots per trust domain. A root that names no trust domain (a brought CA's root
    often does not) is counted as the pod's own: the sidecar trusts it for every peer as well."""
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for root in roots:
        td = _trust_domain_of_root(root) or own_trust_domain
        der = root.public_bytes(Encoding.DER)
        if der not in grouped[td]:
            grouped[td].append(der)
    return {SCHEME + td: b"".join(ders) for td, ders in grouped.items()}


def decide_bundles(bundle: Bundle | None, trust_domain: str, secret_mounted: bool) -> TrustBundles | Refusal:
    """The trust bundles are served while the pod is entitled to anything: even after its own certificate was
    revoked (the CRL saying so is part of them), not once its Secret is gone."""
    if not secret_mounted:
        return Refusal("PERMISSION_DENIED", "the identity Secret is no longer mounted (its WorkloadIdentity was "
                                            "deleted?): nothing is served to this pod")
    if bundle is None:
        return Refusal("UNAVAILABLE", "no trust bundle loaded yet")
    bundles = group_roots(bundle.roots, trust_domain)
    if SCHEME + trust_domain not in bundles:
        return Refusal("UNAVAILABLE", f"the trust bundle carries no root of {trust_domain}")
    return TrustBundles(trust_domain, bundles, tuple(c.public_bytes(Encoding.DER) for c in bundle.crls))


def decide(identity: Identity | None, bundle: Bundle | None, expected_spiffe_id: str, secret_mounted: bool,
           now: dt.datetime, load_error: str | None = None) -> Material | Refusal:
    """What this pod's Workload API serves now: its own SVID and bundles, or the spec's error naming why not."""
    if not secret_mounted:
        return Refusal("PERMISSION_DENIED", f"the identity Secret of {expected_spiffe_id} is no longer mounted "
                                            "(its WorkloadIdentity was deleted?): no X509-SVID for this pod")
    if identity is None or bundle is None:
        return Refusal("UNAVAILABLE", f"no certificate loaded yet: {load_error or 'starting'}")
    serial = identity.serial
    if identity.spiffe_id != expected_spiffe_id:
        return Refusal("PERMISSION_DENIED", f"the mounted certificate {serial} is {identity.spiffe_id}, not this "
                                            f"pod's identity {expected_spiffe_id}")
    for crl in bundle.crls:
        if crl.issuer == identity.leaf.issuer and \
                crl.get_revoked_certificate_by_serial_number(identity.leaf.serial_number) is not None:
            return Refusal("PERMISSION_DENIED", f"certificate {serial} of {identity.spiffe_id} is revoked (its "
                                                "WorkloadIdentity was deleted or revoked): no X509-SVID for this pod")
    if identity.not_after <= now:
        return Refusal("UNAVAILABLE", f"certificate {serial} expired at {identity.not_after.isoformat()} and no "
                                      "renewed one has arrived")
    if identity.not_before > now:
        return Refusal("UNAVAILABLE", f"certificate {serial} is not valid before {identity.not_before.isoformat()}")
    chain, key = list(identity.chain), identity.key  # parsed once, when the volume was read
    if not public_keys_match(chain[0].public_key(), key.public_key()):  # type: ignore[arg-type]
        return Refusal("UNAVAILABLE", f"the key does not match certificate {serial}")
    trust_domain = identity.spiffe_id[len(SCHEME):].split("/", 1)[0]
    trust = decide_bundles(bundle, trust_domain, secret_mounted)
    if isinstance(trust, Refusal):
        return trust
    own_roots = [r for r in bundle.roots if (_trust_domain_of_root(r) or trust_domain) == trust_domain]
    check = verify_svid(chain, own_roots, now)
    if not check.ok:
        return Refusal("UNAVAILABLE", f"certificate {serial} does not verify against the bundle of {trust_domain} "
                                      f"({check.reason}); waiting for the bundle that carries its CA")
    # The SVID is the leaf and its intermediates: a root the chain carries belongs in the bundle only.
    chain_der = b"".join(c.public_bytes(Encoding.DER) for c in chain if c is chain[0] or c.issuer != c.subject)
    key_der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return Material(identity.spiffe_id, serial, chain_der, key_der, trust)


# --- the server ---------------------------------------------------------------------------------------------------


@dataclass
class WorkloadApiStats:
    clients: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # rpc -> open streams
    messages: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (rpc, reason)
    last_push: dict[str, float] = field(default_factory=dict)  # reason -> Unix time
    refusals: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (rpc, code)


def render_workload_api_metrics(stats: WorkloadApiStats, serving: bool) -> bytes:
    p = PREFIX + "workload_api_"
    lines = [f"# HELP {p}serving 1 while an X509-SVID is served, 0 while calls are refused.",
             f"# TYPE {p}serving gauge", f"{p}serving {int(serving)}",
             f"# HELP {p}clients Open Workload API streams, by RPC.", f"# TYPE {p}clients gauge"]
    lines += [f'{p}clients{{rpc="{rpc}"}} {stats.clients[rpc]}' for rpc in RPCS]
    lines += [f"# HELP {p}messages_total Messages pushed on Workload API streams, by RPC and reason.",
              f"# TYPE {p}messages_total counter"]
    lines += [f'{p}messages_total{{rpc="{rpc}",reason="{reason}"}} {n}'
              for (rpc, reason), n in sorted(stats.messages.items())]
    lines += [f"# HELP {p}last_push_timestamp_seconds When a message was last pushed for this reason (Unix time).",
              f"# TYPE {p}last_push_timestamp_seconds gauge"]
    lines += [f'{p}last_push_timestamp_seconds{{reason="{reason}"}} {t!r}'
              for reason, t in sorted(stats.last_push.items())]
    lines += [f"# HELP {p}refusals_total Calls answered with a gRPC error, by RPC and status code.",
              f"# TYPE {p}refusals_total counter"]
    lines += [f'{p}refusals_total{{rpc="{rpc}",code="{code}"}} {n}'
              for (rpc, code), n in sorted(stats.refusals.items())]
    return ("\n".join(lines) + "\n").encode()


Source = Callable[[], tuple[Identity | None, Bundle | None, str | None]]  # (identity, bundle, last load error)


class WorkloadApiServer:
    """The gRPC server on the Unix socket; `refresh()` (after each reload tick) re-decides and wakes the streams."""

    def __init__(self, socket_path: str, source: Source, identity_dir: str, expected_spiffe_id: str,
                 socket_mode: int = DEFAULT_SOCKET_MODE,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 logger: logging.Logger = log) -> None:
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.source = source
        self.identity_dir = identity_dir
        self.expected_spiffe_id = expected_spiffe_id
        self.clock = clock
        self.log = logger
        self.stats = WorkloadApiStats()
        starting = Refusal("UNAVAILABLE", "starting")
        # what each stream sends now, and why it differs from what it sent before
        self.views: dict[str, tuple[Material | TrustBundles | Refusal, str]] = {rpc: (starting, "initial")
                                                                                  for rpc in RPCS}
        self.trust_domain = expected_spiffe_id[len(SCHEME):].split("/", 1)[0]
        self._changed = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    # state ---------------------------------------------------------------------------------------------------------
    def _secret_mounted(self) -> bool:
        return all(os.path.exists(os.path.join(self.identity_dir, name)) for name in (CERT_FILE, KEY_FILE))

    def refresh(self) -> bool:
        """Decide again; wake every stream when what they would be sent changed. True when it changed."""
        identity, bundle, error = self.source()
        mounted, now = self._secret_mounted(), self.clock()
        decided: dict[str, Material | TrustBundles | Refusal] = {
            wire.FETCH_X509_SVID: decide(identity, bundle, self.expected_spiffe_id, mounted, now, error),
            wire.FETCH_X509_BUNDLES: decide_bundles(bundle, self.trust_domain, mounted),
        }
        changed = False
        for rpc, new in decided.items():
            old, _ = self.views[rpc]
            if isinstance(new, Refusal):
                if new == old:
                    continue
                reason = "refused"
                if rpc == wire.FETCH_X509_SVID:
                    self.log.warning("workload API refuses calls: %s: %s", new.code, new.message)
            else:
                found = change_reason(old, new)
                if found is None:
                    continue
                reason = found
                if isinstance(new, Material):
                    self.log.info("workload API serves %s serial=%s reason=%s bundles=%s crls=%d", new.spiffe_id,
                                  new.serial, reason, ",".join(sorted(new.trust.bundles)), len(new.trust.crls))
            self.views[rpc] = (new, reason)
            changed = True
        if changed:
            event, self._changed = self._changed, asyncio.Event()
            event.set()
        return changed

    @property
    def serving(self) -> bool:
        return isinstance(self.views[wire.FETCH_X509_SVID][0], Material)

    def metrics(self) -> bytes:
        return render_workload_api_metrics(self.stats, self.serving)

    # gRPC ----------------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        import grpc  # only pods that serve the Workload API load gRPC
        import grpc.aio

        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a socket left by a previous run of this container
        self.refresh()
        identity_bytes: Callable[[bytes], bytes] = bytes
        methods = {
            wire.FETCH_X509_SVID: grpc.unary_stream_rpc_method_handler(
                self._fetch_x509_svid, request_deserializer=identity_bytes, response_serializer=identity_bytes),
            wire.FETCH_X509_BUNDLES: grpc.unary_stream_rpc_method_handler(
                self._fetch_x509_bundles, request_deserializer=identity_bytes, response_serializer=identity_bytes),
            wire.FETCH_JWT_SVID: grpc.unary_unary_rpc_method_handler(
                self._jwt_unary, request_deserializer=identity_bytes, response_serializer=identity_bytes),
            wire.VALIDATE_JWT_SVID: grpc.unary_unary_rpc_method_handler(
                self._jwt_unary, request_deserializer=identity_bytes, response_serializer=identity_bytes),
            wire.FETCH_JWT_BUNDLES: grpc.unary_stream_rpc_method_handler(
                self._jwt_stream, request_deserializer=identity_bytes, response_serializer=identity_bytes),
        }
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, methods),))
        # Until the chmod below the socket has the umask's mode: connecting needs write permission, so at most the
        # sidecar's own uid could connect meanwhile.
        server.add_insecure_port("unix:" + self.socket_path)
        await server.start()
        os.chmod(self.socket_path, self.socket_mode)
        self._server = server
        self.log.info("workload API listening socket=%s mode=%o", self.socket_path, self.socket_mode)

    async def close(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _refuse(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any], code: str, message: str) -> None:
        import grpc

        self.stats.refusals[(rpc, code)] += 1
        await context.abort(getattr(grpc.StatusCode, code), message)

    async def _check_header(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = context.invocation_metadata() or ()
        if not any((k, v) == SECURITY_HEADER for k, v in metadata):
            await self._refuse(rpc, context, "INVALID_ARGUMENT",
                               f"security header missing from request: every call must carry the gRPC metadata "
                               f"{SECURITY_HEADER[0]}: {SECURITY_HEADER[1]} (SPIFFE Workload Endpoint, section 3)")

    async def _stream(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        await self._check_header(rpc, context)
        self.stats.clients[rpc] += 1
        try:
            sent: bytes | None = None
            while True:
                (view, why), changed = self.views[rpc], self._changed
                if isinstance(view, Refusal):
                    await self._refuse(rpc, context, view.code, view.message)
                    return
                message = view.response()
                if message != sent:
                    reason = "initial" if sent is None else why
                    self.stats.messages[(rpc, reason)] += 1
                    self.stats.last_push[reason] = self.clock().timestamp()
                    sent = message
                    yield message
                await changed.wait()
        finally:
            self.stats.clients[rpc] -= 1

    # grpc.aio recognises a streaming handler by its being an async generator function itself
    async def _fetch_x509_svid(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
                               ) -> AsyncIterator[bytes]:
        async for message in self._stream(wire.FETCH_X509_SVID, context):
            yield message

    async def _fetch_x509_bundles(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
                                  ) -> AsyncIterator[bytes]:
        async for message in self._stream(wire.FETCH_X509_BUNDLES, context):
            yield message

    async def _jwt_unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await self._check_header("JWT", context)
        await self._refuse("JWT", context, "UNIMPLEMENTED", NO_JWT)
        return b""  # pragma: no cover - abort raises

    async def _jwt_stream(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        await self._check_header("JWT", context)
        await self._refuse("JWT", context, "UNIMPLEMENTED", NO_JWT)
        return
        yield b""  # pragma: no cover - makes this an async generator


def socket_mode(text: str) -> int:
    """An octal mode for the socket (argparse type): 0600-0777, never executable-only nonsense."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode like 0660") from None
    if not 0o600 <= mode <= 0o777 or not mode & 0o200:
        raise ValueError(f"{text!r} must be an octal mode within 0600-0777 that lets the owner connect")
    return mode
