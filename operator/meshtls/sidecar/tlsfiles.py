"""The sidecar's mounted volumes, read consistently and turned into TLS contexts.

The kubelet updates a mounted Secret or ConfigMap by writing a new hidden timestamped directory and swapping the
`..data` symlink to it in one rename; the visible files are symlinks through `..data`. So the cheap change signal is
`readlink(..data)`, and a consistent snapshot is read from the directory that link names (it is never modified, only
removed later). Directories without `..data` (plain files) fall back to stat signatures and a key/certificate check.

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

from cryptography import x509

from meshtls.pki.crl import load_crls
from meshtls.pki.errors import PKIError
from meshtls.pki.issue import format_serial
from meshtls.pki.keys import load_private_key_pem, public_keys_match
from meshtls.pki.pem import load_certificates
from meshtls.pki.verify import svid_spiffe_id, verify_svid

log = logging.getLogger("meshtls.proxy")

DATA_LINK = "..data"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
BUNDLE_FILE = "ca.crt"
CRL_FILE = "crl.pem"
IDENTITY_FILES = (CERT_FILE, KEY_FILE)
BUNDLE_FILES = (BUNDLE_FILE, CRL_FILE)
# TLS 1.2 only with forward-secret AEAD suites; TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class VolumeError(Exception):
    """A mounted volume cannot be used right now (missing file, bad content, mid-update); `what` names it."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


# --- reading volumes ---------------------------------------------------------------------------------------------


def volume_version(directory: str, names: tuple[str, ...]) -> str:
    """A cheap signature that changes whenever the kubelet (or anyone) changes the files."""
    try:
        return "data:" + os.readlink(os.path.join(directory, DATA_LINK))
    except OSError:
        pass
    parts = []
    for name in names:
        try:
            st = os.stat(os.path.join(directory, name))
            parts.append(f"{name}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        except OSError:
            parts.append(f"{name}:-")
    return "stat:" + "|".join(parts)


@dataclass(frozen=True)
class Snapshot:
    directory: str
    version: str
    files: dict[str, bytes]


def read_volume(directory: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> Snapshot:
    """Read the files of one consistent version of a volume."""
    try:
        link: str | None = os.readlink(os.path.join(directory, DATA_LINK))
    except OSError:
        link = None
    if link is not None:
        base = os.path.join(directory, link)
        version = "data:" + link
    else:
        base = directory
        version = volume_version(directory, required + optional)
    files: dict[str, bytes] = {}
    for name in required + optional:
        path = os.path.join(base, name)
        try:
            with open(path, "rb") as f:
                files[name] = f.read()
        except FileNotFoundError:
            if name in optional:
                continue
            if link is not None and not os.path.isdir(base):
                raise VolumeError(directory, "changed while being read (will retry)") from None
            raise VolumeError(os.path.join(directory, name), "is missing") from None
        except OSError as exc:
            raise VolumeError(os.path.join(directory, name), f"cannot be read ({exc.strerror})") from None
    return Snapshot(directory, version, files)


# --- what the files mean -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """This workload's certificate chain and key, checked to belong together."""

    version: str
    chain_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate
    spiffe_id: str

    @property
    def serial(self) -> str:
        return format_serial(self.leaf.serial_number)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc


def parse_identity(snapshot: Snapshot) -> Identity:
    where = snapshot.directory
    try:
        certs = load_certificates(snapshot.files[CERT_FILE], os.path.join(where, CERT_FILE))
        key = load_private_key_pem(snapshot.files[KEY_FILE], os.path.join(where, KEY_FILE))
        leaf = certs[0]
        if not public_keys_match(leaf.public_key(), key.public_key()):  # type: ignore[arg-type]
            raise VolumeError(
                os.path.join(where, KEY_FILE),
                f"does not match the certificate in {CERT_FILE} (serial {format_serial(leaf.serial_number)}); "
                "keeping the previous identity",
            )
        spiffe_id = str(svid_spiffe_id(leaf))
    except PKIError as exc:
        raise VolumeError(exc.field, exc.message) from None
    return Identity(snapshot.version, snapshot.files[CERT_FILE], snapshot.files[KEY_FILE], leaf, spiffe_id)


@dataclass(frozen=True)
class Bundle:
    """The trust bundle: every root a peer may chain to, and the CRLs (one per CA) that revoke leaves."""

    version: str
    roots_pem: bytes
    roots: tuple[x509.Certificate, ...]
    crl_pem: bytes
    crls: tuple[x509.CertificateRevocationList, ...]

    @property
    def crl_next_update(self) -> dt.datetime | None:
        times = [c.next_update_utc for c in self.crls if c.next_update_utc is not None]
        return min(times) if times else None

    def roots_without_crl(self) -> list[x509.Certificate]:
        issuers = {c.issuer for c in self.crls}
        return [r for r in self.roots if r.subject not in issuers]


def parse_bundle(snapshot: Snapshot) -> Bundle:
    where = snapshot.directory
    try:
        roots = load_certificates(snapshot.files[BUNDLE_FILE], os.path.join(where, BUNDLE_FILE))
        crl_data = snapshot.files.get(CRL_FILE, b"")
        crls = load_crls(crl_data, os.path.join(where, CRL_FILE)) if crl_data.strip() else []
    except PKIError as exc:
        raise VolumeError(exc.field, exc.message) from None
    if crl_data.strip() and not crls:
        raise VolumeError(os.path.join(where, CRL_FILE), "holds no PEM CRL")
    for crl in crls:
        # A CRL whose issuer is one of our roots must verify with it: OpenSSL would otherwise refuse every
        # peer of that CA. CRLs of intermediates (not in the bundle) are checked by OpenSSL at handshake time.
        for root in roots:
            if root.subject == crl.issuer and not crl.is_signature_valid(root.public_key()):  # type: ignore[arg-type]
                raise VolumeError(
                    os.path.join(where, CRL_FILE),
                    f"holds a CRL for {crl.issuer.rfc4514_string()!r} whose signature does not verify",
                )
    return Bundle(snapshot.version, snapshot.files[BUNDLE_FILE], tuple(roots), crl_data, tuple(crls))


# --- TLS contexts ------------------------------------------------------------------------------------------------


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
        try:
            chain = load_certificates(identity.chain_pem)
        except PKIError:  # pragma: no cover - parsed once already
            return
        check = verify_svid(chain, list(bundle.roots), self.clock())
        if not check.ok:
            self.log.warning("own certificate %s does not verify against the trust bundle: %s", identity.serial,
                        check.reason)
