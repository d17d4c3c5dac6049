"""The sidecar's mounted volumes, read consistently and parsed into an identity and a trust bundle.

The kubelet updates a mounted Secret or ConfigMap by writing a new hidden timestamped directory and swapping the
`..data` symlink to it in one rename; the visible files are symlinks through `..data`. So the cheap change signal is
`readlink(..data)`, and a consistent snapshot is read from the directory that link names (it is never modified, only
removed later). Directories without `..data` (plain files) fall back to stat signatures and a key/certificate check.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

from cryptography import x509

from meshtls.dataplane.layout import BUNDLE_FILE, CERT_FILE, CRL_FILE, DATA_LINK, KEY_FILE
from meshtls.pki.crl import load_crls
from meshtls.pki.errors import PKIError
from meshtls.pki.issue import format_serial
from meshtls.pki.keys import PrivateKey, load_private_key_pem, public_keys_match
from meshtls.pki.pem import load_certificates
from meshtls.pki.verify import svid_spiffe_id


class VolumeError(Exception):
    """A mounted volume cannot be used right now (missing file, bad content, mid-update); `what` names it."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


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
    """This workload's certificate chain and key, checked to belong together. Parsed once per version of the volume:
    the TLS contexts and the Workload API (on every reload tick) read them from here."""

    version: str
    chain_pem: bytes
    key_pem: bytes
    chain: tuple[x509.Certificate, ...]  # the leaf first
    key: PrivateKey = field(compare=False, repr=False)
    spiffe_id: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

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
    return Identity(snapshot.version, snapshot.files[CERT_FILE], snapshot.files[KEY_FILE], tuple(certs), key, spiffe_id)


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
