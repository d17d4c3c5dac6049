"""SPIFFE IDs, parsed and validated as the SPIFFE ID specification says.

spiffe://<trust-domain>/<path>: scheme `spiffe`, a lowercase trust domain of [a-z0-9._-], no port, userinfo,
query or fragment; path segments of [A-Za-z0-9._-], none empty, `.` or `..`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshtls.pki.errors import PKIError

SCHEME = "spiffe://"
# The spec bounds a whole SPIFFE ID to 2048 bytes and a trust domain to 255 (a DNS name's length).
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    def workload(self) -> tuple[str, str] | None:
        """(namespace, serviceaccount) when this is a Kubernetes workload ID /ns/<ns>/sa/<sa>."""
        s = self.segments
        if len(s) == 4 and s[0] == "ns" and s[2] == "sa":
            return s[1], s[3]
        return None


def validate_trust_domain(name: str, field: str = "trustDomain") -> str:
    if not name:
        raise PKIError(field, "must not be empty")
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        raise PKIError(field, f"must be at most {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN.fullmatch(name):
        raise PKIError(field, f"{name!r} may contain only lowercase letters, digits, '.', '-' and '_'")
    return name


def validate_path_segment(segment: str, field: str) -> str:
    if segment in ("", ".", ".."):
        raise PKIError(field, f"path segment {segment!r} is not allowed (empty, '.' and '..' are forbidden)")
    if not _SEGMENT.fullmatch(segment):
        raise PKIError(field, f"path segment {segment!r} may contain only letters, digits, '.', '-' and '_'")
    return segment


def parse_spiffe_id(text: str, field: str = "spiffeId") -> SpiffeId:
    """Parse and validate a SPIFFE ID; raises PKIError naming `field` and the rule broken."""
    if len(text.encode()) > MAX_ID_LENGTH:
        raise PKIError(field, f"must be at most {MAX_ID_LENGTH} bytes")
    if not text.startswith(SCHEME):
        raise PKIError(field, f"{text!r} must start with {SCHEME!r}")
    rest = text[len(SCHEME):]
    trust_domain, slash, path = rest.partition("/")
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in text:
            raise PKIError(field, f"{text!r} must not contain {what}")
    if "@" in trust_domain:
        raise PKIError(field, f"{text!r} must not contain userinfo")
    if ":" in trust_domain:
        raise PKIError(field, f"{text!r} must not contain a port")
    validate_trust_domain(trust_domain, field)
    if not slash:
        return SpiffeId(trust_domain, "")
    if not path:
        raise PKIError(field, f"{text!r} must not end with '/'")
    for segment in path.split("/"):
        validate_path_segment(segment, field)
    return SpiffeId(trust_domain, "/" + path)


def workload_spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """The identity of a Kubernetes ServiceAccount: spiffe://<td>/ns/<namespace>/sa/<serviceaccount>."""
    validate_trust_domain(trust_domain)
    validate_path_segment(namespace, "namespace")
    validate_path_segment(service_account, "serviceAccountName")
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{service_account}")


def matches_pattern(spiffe_id: str, pattern: str) -> bool:
    """Allow-list match: exact, or `prefix/*` matching any ID below prefix (a whole-segment prefix)."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return spiffe_id.startswith(pattern[:-1])
    return spiffe_id == pattern
