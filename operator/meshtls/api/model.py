"""WorkloadIdentity and TrustDomain specs with their defaults, parsed from the resources' bodies.

The API server already refuses most bad specs (schema bounds, CEL); what it cannot see (the TTL against the
trust domain's range, a trust domain that does not exist) is checked here, with the field path in the error.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtls.api.durations import format_duration, parse_duration
from meshtls.pki.errors import PKIError
from meshtls.pki.issue import validate_dns_name
from meshtls.pki.keys import DEFAULT_KEY_ALGORITHM, KeyAlgorithm
from meshtls.pki.spiffe import SpiffeId, parse_spiffe_id, validate_trust_domain, workload_spiffe_id

DEFAULT_TTL = dt.timedelta(hours=1)
DEFAULT_MIN_TTL = dt.timedelta(minutes=5)
DEFAULT_MAX_TTL = dt.timedelta(hours=24)
ABSOLUTE_MIN_TTL = dt.timedelta(seconds=10)  # tests and the demo watch real rotations within seconds
DEFAULT_RENEW_AT_PERCENT = 200 / 3  # cert-manager's 2/3
DEFAULT_CA_VALIDITY = dt.timedelta(days=365)
DEFAULT_CA_ROTATE_BEFORE_PERCENT = 30
DEFAULT_BACKDATE = dt.timedelta(seconds=60)
DEFAULT_CRL_VALIDITY = dt.timedelta(hours=24)
DEFAULT_PROPAGATION_DELAY = dt.timedelta(seconds=90)  # kubelets refresh mounted ConfigMaps within ~60-90 s

MAX_LABEL_VALUE = 63
MAX_OBJECT_NAME = 253
SIDECAR_CONFIG_SUFFIX = "-meshtls-proxy"  # sidecar.target.sidecar_configmap_name (api may not import sidecar)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class SpecError(PKIError):
    """A spec the operator cannot act on; `reason` becomes the condition reason users see."""

    def __init__(self, field: str, message: str, reason: str = "InvalidSpec") -> None:
        super().__init__(field, message)
        self.reason = reason


def _get(body: Mapping[str, Any], *path: str) -> Any:
    value: Any = body
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _duration(value: Any, field_path: str, default: dt.timedelta) -> dt.timedelta:
    if value in (None, ""):
        return default
    try:
        return parse_duration(str(value), field_path)
    except PKIError as exc:
        raise SpecError(field_path, exc.message) from None


def _algorithm(value: Any, field_path: str, default: KeyAlgorithm) -> KeyAlgorithm:
    if value in (None, ""):
        return default
    try:
        return KeyAlgorithm.parse(str(value), field_path)
    except PKIError as exc:
        raise SpecError(field_path, exc.message) from None


@dataclass(frozen=True)
class CertificatePolicy:
    default_ttl: dt.timedelta = DEFAULT_TTL
    min_ttl: dt.timedelta = DEFAULT_MIN_TTL
    max_ttl: dt.timedelta = DEFAULT_MAX_TTL
    default_key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM
    backdate: dt.timedelta = DEFAULT_BACKDATE


@dataclass(frozen=True)
class TrustDomainSpec:
    name: str
    ca_secret_ref: str | None = None  # a Secret in the operator's namespace the user brings
    ca_key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM
    ca_validity: dt.timedelta = DEFAULT_CA_VALIDITY
    ca_rotate_before: dt.timedelta | None = None  # None: DEFAULT_CA_ROTATE_BEFORE_PERCENT of the validity
    ca_propagation_delay: dt.timedelta = DEFAULT_PROPAGATION_DELAY
    policy: CertificatePolicy = field(default_factory=CertificatePolicy)
    bundle_configmap: str = "meshtls-bundle"
    bundle_namespace_selector: dict[str, str] = field(default_factory=dict)  # extra namespaces by label
    crl_validity: dt.timedelta = DEFAULT_CRL_VALIDITY
    federates_with: tuple[dict[str, str], ...] = ()

    def rotate_before(self, validity: dt.timedelta) -> dt.timedelta:
        return self.ca_rotate_before or validity * DEFAULT_CA_ROTATE_BEFORE_PERCENT / 100


def parse_trust_domain(body: Mapping[str, Any]) -> TrustDomainSpec:
    name = str(_get(body, "metadata", "name") or "")
    try:
        validate_trust_domain(name, "metadata.name")
    except PKIError as exc:
        raise SpecError(exc.field, exc.message) from None
    if len(name) > MAX_LABEL_VALUE:
        raise SpecError("metadata.name", f"may have at most {MAX_LABEL_VALUE} characters: meshtls labels its Secrets "
                                         "and ConfigMaps with the trust domain")
    spec = _get(body, "spec") or {}
    ca = spec.get("ca") or {}
    certs = spec.get("certificates") or {}
    min_ttl = _duration(certs.get("minTTL"), "spec.certificates.minTTL", DEFAULT_MIN_TTL)
    max_ttl = _duration(certs.get("maxTTL"), "spec.certificates.maxTTL", DEFAULT_MAX_TTL)
    default_ttl = _duration(certs.get("defaultTTL"), "spec.certificates.defaultTTL", DEFAULT_TTL)
    if min_ttl < ABSOLUTE_MIN_TTL:
        raise SpecError("spec.certificates.minTTL", f"must be at least {format_duration(ABSOLUTE_MIN_TTL)}")
    if min_ttl > max_ttl:
        raise SpecError("spec.certificates.minTTL", "must not exceed spec.certificates.maxTTL")
    if not min_ttl <= default_ttl <= max_ttl:
        default_ttl = min(max(default_ttl, min_ttl), max_ttl) if certs.get("defaultTTL") is None else default_ttl
        if not min_ttl <= default_ttl <= max_ttl:
            raise SpecError("spec.certificates.defaultTTL",
                            f"{format_duration(default_ttl)} is outside minTTL-maxTTL "
                            f"({format_duration(min_ttl)}-{format_duration(max_ttl)})")
    secret_ref = _get(ca, "secretRef", "name")
    bundle = spec.get("bundle") or {}
    return TrustDomainSpec(
        name=name,
        ca_secret_ref=str(secret_ref) if secret_ref else None,
        ca_key_algorithm=_algorithm(ca.get("keyAlgorithm"), "spec.ca.keyAlgorithm", DEFAULT_KEY_ALGORITHM),
        ca_validity=_duration(ca.get("validity"), "spec.ca.validity", DEFAULT_CA_VALIDITY),
        ca_rotate_before=_duration(ca.get("rotateBefore"), "spec.ca.rotateBefore", dt.timedelta(0)) or None,
        ca_propagation_delay=_duration(ca.get("propagationDelay"), "spec.ca.propagationDelay",
                                       DEFAULT_PROPAGATION_DELAY),
        policy=CertificatePolicy(
            default_ttl=default_ttl,
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            default_key_algorithm=_algorithm(certs.get("defaultKeyAlgorithm"),
                                             "spec.certificates.defaultKeyAlgorithm", DEFAULT_KEY_ALGORITHM),
            backdate=_duration(certs.get("backdate"), "spec.certificates.backdate", DEFAULT_BACKDATE),
        ),
        bundle_configmap=str(bundle.get("configMapName") or "meshtls-bundle"),
        bundle_namespace_selector=dict(_get(bundle, "namespaceSelector", "matchLabels") or {}),
        crl_validity=_duration(_get(spec, "crl", "validity"), "spec.crl.validity", DEFAULT_CRL_VALIDITY),
        federates_with=tuple(dict(f) for f in spec.get("federatesWith") or []),
    )


@dataclass(frozen=True)
class InboundPort:
    port: int
    app_port: int


@dataclass(frozen=True)
class OutboundUpstream:
    listen_port: int
    address: str
    peer: str


@dataclass(frozen=True)
class WorkloadIdentitySpec:
    namespace: str
    name: str
    service_account: str
    trust_domain: str | None
    dns_names: tuple[str, ...] = ()
    ttl: dt.timedelta | None = None  # None: the trust domain's default
    renew_before: dt.timedelta | None = None
    renew_at_percent: float | None = None
    key_algorithm: KeyAlgorithm | None = None  # None: the trust domain's default
    secret_name: str = ""
    pod_selector: dict[str, str] = field(default_factory=dict)
    inbound: tuple[InboundPort, ...] = ()
    outbound: tuple[OutboundUpstream, ...] = ()
    allowed_peers: tuple[str, ...] = ()

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        """Derived, never free-form: no namespace can claim another's identity."""
        return workload_spiffe_id(trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True)
class EffectiveIdentity:
    """A WorkloadIdentity resolved against its trust domain: every value the issuer needs, defaults applied."""

    spec: WorkloadIdentitySpec
    trust_domain: str
    spiffe_id: SpiffeId
    ttl: dt.timedelta
    key_algorithm: KeyAlgorithm
    renew_before: dt.timedelta | None
    renew_at_fraction: float
    backdate: dt.timedelta


def parse_workload_identity(body: Mapping[str, Any]) -> WorkloadIdentitySpec:
    namespace = str(_get(body, "metadata", "namespace") or "")
    name = str(_get(body, "metadata", "name") or "")
    spec = _get(body, "spec") or {}
    sa = spec.get("serviceAccountName")
    if not isinstance(sa, str) or not sa:
        raise SpecError("spec.serviceAccountName", "is required")
    if len(sa) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in sa.split(".")):
        raise SpecError("spec.serviceAccountName", f"{sa!r} is not a valid ServiceAccount name (RFC 1123 subdomain)")
    dns_names = tuple(spec.get("dnsNames") or ())
    for i, n in enumerate(dns_names):
        try:
            validate_dns_name(str(n), f"spec.dnsNames[{i}]")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    percent = spec.get("renewAtPercent")
    if percent is not None and not (10 <= float(percent) <= 95):
        raise SpecError("spec.renewAtPercent", f"{percent} is outside 10-95")
    allowed = tuple(str(p) for p in spec.get("allowedPeers") or ())
    for i, pattern in enumerate(allowed):
        try:
            if pattern != "*":
                parse_spiffe_id(pattern[:-2] if pattern.endswith("/*") else pattern, f"spec.allowedPeers[{i}]")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    td = spec.get("trustDomain")
    if td:
        try:
            validate_trust_domain(str(td), "spec.trustDomain")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    secret_name = str(spec.get("secretName") or f"{name}-mtls")
    if len(secret_name) > MAX_OBJECT_NAME:
        raise SpecError("spec.secretName", f"the Secret name {secret_name[:40]}... would have {len(secret_name)} "
                                           f"characters (at most {MAX_OBJECT_NAME}): set a shorter spec.secretName")
    if (spec.get("inbound") or spec.get("outbound")) and len(name + SIDECAR_CONFIG_SUFFIX) > MAX_OBJECT_NAME:
        raise SpecError("metadata.name", f"the sidecar ConfigMap {name[:40]}...{SIDECAR_CONFIG_SUFFIX} would exceed "
                                         f"{MAX_OBJECT_NAME} characters: use a shorter name")
    return WorkloadIdentitySpec(
        namespace=namespace,
        name=name,
        service_account=sa,
        trust_domain=str(td) if td else None,
        dns_names=dns_names,
        ttl=_duration(spec.get("ttl"), "spec.ttl", dt.timedelta(0)) or None,
        renew_before=_duration(spec.get("renewBefore"), "spec.renewBefore", dt.timedelta(0)) or None,
        renew_at_percent=float(percent) if percent is not None else None,
        key_algorithm=_algorithm(spec.get("keyAlgorithm"), "spec.keyAlgorithm", DEFAULT_KEY_ALGORITHM)
        if spec.get("keyAlgorithm") else None,
        secret_name=secret_name,
        pod_selector=dict(_get(spec, "podSelector", "matchLabels") or {}),
        inbound=tuple(InboundPort(int(p["port"]), int(p["appPort"])) for p in spec.get("inbound") or ()),
        outbound=tuple(OutboundUpstream(int(u["listenPort"]), str(u["address"]), str(u["peer"]))
                       for u in spec.get("outbound") or ()),
        allowed_peers=allowed,
    )


def resolve_identity(spec: WorkloadIdentitySpec, td: TrustDomainSpec) -> EffectiveIdentity:
    """Apply the trust domain's defaults and check what only it can bound (the TTL range)."""
    policy = td.policy
    ttl = spec.ttl or policy.default_ttl
    if not policy.min_ttl <= ttl <= policy.max_ttl:
        raise SpecError("spec.ttl", f"{format_duration(ttl)} is outside the trust domain's range "
                                    f"{format_duration(policy.min_ttl)}-{format_duration(policy.max_ttl)}",
                        reason="TTLOutOfRange")
    if spec.renew_before is not None and spec.renew_before >= ttl:
        raise SpecError("spec.renewBefore", f"{format_duration(spec.renew_before)} must be shorter than the "
                                            f"ttl {format_duration(ttl)}")
    return EffectiveIdentity(
        spec=spec,
        trust_domain=td.name,
        spiffe_id=spec.spiffe_id(td.name),
        ttl=ttl,
        key_algorithm=spec.key_algorithm or policy.default_key_algorithm,
        renew_before=spec.renew_before,
        renew_at_fraction=(spec.renew_at_percent or DEFAULT_RENEW_AT_PERCENT) / 100,
        # a 20 s certificate backdated by a minute would be mostly in the past: cap at a quarter of the TTL
        backdate=min(policy.backdate, ttl / 4),
    )
