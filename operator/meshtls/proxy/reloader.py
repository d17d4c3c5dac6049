"""TLS contexts built from the sidecar's volumes, and the reloader that rebuilds them when the volumes change.

Nothing here swaps anything in: `Reloader.check()` builds new contexts and hands them back; serving code decides.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from meshtls.dataplane.layout import BUNDLE_FILE, BUNDLE_FILES, CRL_FILE, IDENTITY_FILES
from meshtls.pki.verify import verify_svid
from meshtls.proxy.volumes import (
    Bundle,
    Identity,
    VolumeError,
    parse_bundle,
    parse_identity,
    read_volume,
    volume_version,
)

log = logging.getLogger("meshtls.proxy")

# TLS 1.2 only with forward-secret AEAD suites; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@contextlib.contextmanager
def pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can load `data` from. An anonymous memory file when the OS has one: keys never touch disk."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("meshtls-pem", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshtls-") as d:  # pragma: no cover - non-Linux
        path = os.path.join(d, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass
class TLSContexts:
    """One generation of TLS material: a server and a client context built from the same identity and bundle.

    Connections hold the generation they started with; a reload makes a new one for new handshakes only.
    Client sessions (for resumption) belong to a generation: a new bundle or identity drops them.
    """

    identity: Identity
    bundle: Bundle
    server: ssl.SSLContext
    client: ssl.SSLContext
    crl_check: bool
    generation: int
    client_sessions: dict[str, ssl.SSLSession] = field(default_factory=dict)
    # upstreams that sent no session ticket: not asked again until the contexts are rebuilt (see _capture_session)
    ticketless: set[str] = field(default_factory=set)


def _base_context(purpose: ssl._SSLMethod, identity: Identity, bundle: Bundle, crl_check: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.check_hostname = False  # peers are identified by SPIFFE ID, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    with pem_path(identity.chain_pem) as cert_path, pem_path(identity.key_pem) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    # cafile (not cadata) so that OpenSSL also picks up the CRLs in the same file.
    trust = bundle.roots_pem.rstrip(b"\n") + b"\n" + (bundle.crl_pem if crl_check else b"")
    with pem_path(trust) as trust_path:
        ctx.load_verify_locations(cafile=trust_path)
    if crl_check:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def build_contexts(identity: Identity, bundle: Bundle, generation: int, session_tickets: int = 1) -> TLSContexts:
    """session_tickets: TLS 1.3 tickets the server side sends per handshake. One is enough (a client sidecar keeps
    one session per upstream); 0 saves the ticket's cost when clients never resume."""
    crl_check = bool(bundle.crls)
    server = _base_context(ssl.PROTOCOL_TLS_SERVER, identity, bundle, crl_check)
    server.num_tickets = session_tickets
    client = _base_context(ssl.PROTOCOL_TLS_CLIENT, identity, bundle, crl_check)
    return TLSContexts(identity, bundle, server, client, crl_check, generation)


# --- the reload loop's brain -------------------------------------------------------------------------------------


@dataclass
class ReloadStatus:
    loaded: int = 0  # generations built
    failures: int = 0  # distinct failed attempts
    last_error: str | None = None


class Reloader:
    """Polls the identity and bundle volumes; builds a new TLSContexts generation when something changed.

    Each part keeps its last good version: a broken identity update does not block a new CRL, and vice versa.
    A failed part is retried on every tick (the kubelet may be mid-update) but logged once per distinct error.
    """

    def __init__(
        self,
        identity_dir: str,
        bundle_dir: str,
        expected_spiffe_id: str | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        logger: logging.Logger = log,
        session_tickets: int = 1,
    ) -> None:
        self.log = logger
        self.session_tickets = session_tickets
        self.identity_dir = identity_dir
        self.bundle_dir = bundle_dir
        self.expected_spiffe_id = expected_spiffe_id
        self.clock = clock
        self.current: TLSContexts | None = None
        self.status = ReloadStatus()
        self._identity: Identity | None = None
        self._bundle: Bundle | None = None
        self._errors: dict[str, str] = {}  # part -> last logged error

    def _fail(self, part: str, version: str, message: str) -> None:
        key = f"{version} {message}"
        if self._errors.get(part) != key:
            self._errors[part] = key
            self.status.failures += 1
            self.log.warning("reload %s failed: %s", part, message)
        self.status.last_error = message

    def _ok(self, part: str) -> None:
        self._errors.pop(part, None)
        if not self._errors:
            self.status.last_error = None

    def _load_identity(self) -> bool:
        version = volume_version(self.identity_dir, IDENTITY_FILES)
        if self._identity is not None and self._identity.version == version:
            return False
        try:
            identity = parse_identity(read_volume(self.identity_dir, IDENTITY_FILES))
        except VolumeError as exc:
            self._fail("identity", version, str(exc))
            return False
        now = self.clock()
        current = self._identity
        if identity.not_after <= now and current is not None and current.not_after > now:
            self._fail("identity", identity.version,
                       f"new certificate {identity.serial} expired at {identity.not_after.isoformat()}; "
                       f"keeping {current.serial}")
            return False
        if self.expected_spiffe_id and identity.spiffe_id != self.expected_spiffe_id:
            self.log.warning("identity certificate %s carries %s, the config says %s",
                        identity.serial, identity.spiffe_id, self.expected_spiffe_id)
        if current is not None and current.chain_pem == identity.chain_pem and current.key_pem == identity.key_pem:
            self._identity = identity  # same content, new version: nothing to rebuild
            self._ok("identity")
            return False
        self._identity = identity
        self._ok("identity")
        return True

    def _load_bundle(self) -> bool:
        version = volume_version(self.bundle_dir, BUNDLE_FILES)
        if self._bundle is not None and self._bundle.version == version:
            return False
        try:
            bundle = parse_bundle(read_volume(self.bundle_dir, (BUNDLE_FILE,), (CRL_FILE,)))
        except VolumeError as exc:
            self._fail("bundle", version, str(exc))
            return False
        current = self._bundle
        self._bundle = bundle
        self._ok("bundle")
        return current is None or (current.roots_pem, current.crl_pem) != (bundle.roots_pem, bundle.crl_pem)

    def check(self) -> TLSContexts | None:
        """One tick: a new generation when something changed and everything is usable, else None."""
        changed = self._load_identity()
        changed = self._load_bundle() or changed
        if not changed or self._identity is None or self._bundle is None:
            return None
        identity, bundle = self._identity, self._bundle
        try:
            contexts = build_contexts(identity, bundle, self.status.loaded + 1, self.session_tickets)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._fail("tls", identity.version + bundle.version, f"cannot build TLS contexts: {exc}")
            # Forget the parts so the next tick tries again instead of believing they are loaded.
            self._identity, self._bundle = (
                (self.current.identity, self.current.bundle) if self.current else (None, None)
            )
            return None
        self._ok("tls")
        self._warn_about(contexts)
        self.status.loaded += 1
        self.current = contexts
        return contexts

    def _warn_about(self, contexts: TLSContexts) -> None:
        bundle, identity = contexts.bundle, contexts.identity
        next_update = bundle.crl_next_update
        if not bundle.crls:
            self.log.warning("no CRL in %s: revocation is not checked", os.path.join(self.bundle_dir, CRL_FILE))
        elif next_update is not None and next_update <= self.clock():
            self.log.warning("a CRL in %s expired at %s: OpenSSL refuses every peer until a fresh one arrives",
                             os.path.join(self.bundle_dir, CRL_FILE), next_update.isoformat())
        else:
            for root in bundle.roots_without_crl():
                self.log.warning("no CRL issued by %s in %s: peers whose certificates it issued directly are refused",
                            root.subject.rfc4514_string(), os.path.join(self.bundle_dir, CRL_FILE))
        check = verify_svid(list(identity.chain), list(bundle.roots), self.clock())
        if not check.ok:
            self.log.warning("own certificate %s does not verify against the trust bundle: %s", identity.serial,
                        check.reason)
