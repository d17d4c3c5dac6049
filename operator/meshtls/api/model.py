"""WorkloadIdentity and TrustDomain specs with their defaults, parsed from the resources' bodies.

The API server already refuses most bad specs (schema bounds, CEL); what it cannot see (the TTL against the
trust domain's range, a trust domain that does not exist) is checked here, with the field path in the error.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtls.api.constants import DEFAULT_BUNDLE_CONFIGMAP
from meshtls.api.durations import format_duration, parse_duration
from meshtls.api.names import MAX_OBJECT_NAME, SIDECAR_CONFIG_SUFFIX, default_secret_name
from meshtls.api.ports import RESERVED_PORTS, port_collision
from meshtls.api.reasons import Reason
from meshtls.pki.ca import DEFAULT_CA_VALIDITY
from meshtls.pki.crl import DEFAULT_CRL_VALIDITY
from meshtls.pki.errors import PKIError
from meshtls.pki.issue import DEFAULT_BACKDATE, MAX_DNS_NAME_LENGTH, validate_dns_name
from meshtls.pki.keys import DEFAULT_KEY_ALGORITHM, KeyAlgorithm
from meshtls.pki.spiffe import SpiffeId, parse_spiffe_id, validate_trust_domain, workload_spiffe_id

DEFAULT_TTL = dt.timedelta(hours=1)
DEFAULT_MIN_TTL = dt.timedelta(minutes=5)
DEFAULT_MAX_TTL = dt.timedelta(hours=24)
ABSOLUTE_MIN_TTL = dt.timedelta(seconds=10)  # tests and the demo watch real rotations within seconds
DEFAULT_RENEW_AT_PERCENT = 200 / 3  # cert-manager's 2/3
DEFAULT_CA_ROTATE_BEFORE_PERCENT = 30
DEFAULT_PROPAGATION_DELAY = dt.timedelta(seconds=90)  # kubelets refresh mounted ConfigMaps within ~60-90 s

MAX_LABEL_VALUE = 63
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

# Bounds the CRDs' CEL rules enforce too (crds/*.yaml); the operator checks them again because a cluster's CRDs can
# be older than the operator. tests/test_spec_bounds.py runs the hostile corpus through both.
MAX_WORKLOAD_TTL = dt.timedelta(hours=8784)
# The renewal point must leave a sane part of the lifetime on both sides: renewBefore within 5 %-90 % of the TTL,
# i.e. renewal between 10 % and 95 % of the lifetime, the same range renewAtPercent allows.
RENEW_AT_PERCENT_RANGE = (10, 95)
RENEW_BEFORE_PERCENT_RANGE = (5, 90)
# A CRL is re-signed at half its validity and reaches sidecars through kubelet's ConfigMap sync (~propagationDelay):
# under 5 m there is no room for a missed re-sign before every sidecar fails closed; over 10 d (the CA/Browser
# Forum's limit for CRLs) a revocation-free replay of an old CRL stays acceptable for too long.
CRL_VALIDITY_RANGE = (dt.timedelta(minutes=5), dt.timedelta(hours=240))
# 0 s would let a new CA sign before any bundle carries it; over an hour a CA rotation stalls for no gain.
PROPAGATION_DELAY_RANGE = (dt.timedelta(seconds=1), dt.timedelta(hours=1))
CA_VALIDITY_RANGE = (dt.timedelta(hours=1), dt.timedelta(hours=87600))  # 1 h for demos, at most 10 years
MAX_BACKDATE = dt.timedelta(hours=1)  # clock skew is seconds; an hour is already generous (and capped at TTL/4)
MAX_CA_ROTATE_BEFORE_PERCENT = 90  # a new CA must live outside its rotation window for a while, or it rotates again
# ConfigMaps Kubernetes (or its usual add-ons and meshes) write themselves: a bundle under one of these names would
# fight their owner. Names starting with kube- are the system's by convention; -meshtls-proxy is the sidecar config.
RESERVED_CONFIGMAP_PREFIX = "kube-"  # kube-root-ca.crt in every namespace, kube-proxy, kube-apiserver-..., ...
RESERVED_CONFIGMAP_NAMES = ("extension-apiserver-authentication", "cluster-info", "coredns", "kubeadm-config",
                            "kubelet-config", "istio-ca-root-cert", "openshift-service-ca.crt",
                            "linkerd-identity-trust-roots")
# A TrustDomain's default DNS policy: the identity's own namespace's Service names, in every form a pod resolves.
# `*` is one label; a leading `**` one or more (pods under a headless Service: web-0.web.<ns>.svc...).
DEFAULT_ALLOWED_DNS_NAMES = ("*", "*.$(namespace)", "**.$(namespace).svc", "**.$(namespace).svc.cluster.local")
NAMESPACE_PLACEHOLDER = "$(namespace)"
MAX_ALLOWED_DNS_NAMES = 64
_PATTERN_LABEL = r"(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?|\$\(namespace\))"
_DNS_PATTERN = re.compile(rf"(\*\*|{_PATTERN_LABEL})(\.{_PATTERN_LABEL})*")
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_SPEC_DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")
_ADDRESS = re.compile(r"([A-Za-z0-9.-]+):([1-9][0-9]{0,4})")


class DataPlane(enum.StrEnum):
    """The sidecar a pod is injected with; both are rendered from the one sidecar model (meshtls.dataplane)."""

    MESHTLS_PROXY = "meshtls-proxy"
    ENVOY = "envoy"


# The operator-wide default when neither the identity nor its TrustDomain names one: `meshtls operator`'s without
# --default-data-plane. meshtls-proxy, as a pip install has Envoy only with the `envoy` extra; the chart passes its
# `dataPlane` value (envoy) instead.
DEFAULT_DATA_PLANE = DataPlane.MESHTLS_PROXY


def choose_data_plane(identity: DataPlane | None, trust_domain: DataPlane | None,
                      operator_default: DataPlane) -> DataPlane:
    """The identity's own choice, else its TrustDomain's default, else the operator's."""
    return identity or trust_domain or operator_default


class SpecError(PKIError):
    """A spec the operator cannot act on; `reason` becomes the condition reason users see."""

    def __init__(self, field: str, message: str, reason: str = Reason.INVALID_SPEC) -> None:
        super().__init__(field, message)
        self.reason = reason


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _get(body: Mapping[str, Any], *path: str) -> Any:
    value: Any = body
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _object(value: Any, field_path: str, what: str = "fields") -> Mapping[str, Any]:
    """A nested object of the spec; absent is empty, anything but a mapping is refused naming the field."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(field_path, f"must be an object (its {what}), not {_kind(value)}")
    return value


def _list(value: Any, field_path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise SpecError(field_path, f"must be a list, not {_kind(value)}")
    return list(value)


def _spec(body: Mapping[str, Any], kind: str, required: bool = False) -> Mapping[str, Any]:
    if required and _get(body, "spec") is None:
        raise SpecError("spec", f"is required (the {kind} fields, serviceAccountName at least)")
    return _object(_get(body, "spec"), "spec", f"{kind} fields")


def _string(value: Any, field_path: str) -> str:
    if not isinstance(value, str):
        raise SpecError(field_path, f"must be a string, not {_kind(value)}")
    return value


def _port(value: Any, field_path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SpecError(field_path, f"{value!r} is not a port number (1-65535)")
    return value


def _optional_duration(value: Any, field_path: str) -> dt.timedelta | None:
    """None when absent; an explicit 0s stays 0s (and is then bounded), never silently the default."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(field_path, f"must be a duration string like 90s, 5m or 1h, not {_kind(value)}")
    if not _SPEC_DURATION.fullmatch(value):  # the CRDs' pattern: Go's units, no days, no blanks
        raise SpecError(field_path, f"{value[:40]!r} is not a duration like 90s, 5m, 1h or 1h30m (units ms, s, m, h)")
    try:
        return parse_duration(value, field_path)
    except PKIError as exc:
        raise SpecError(field_path, exc.message) from None


def _duration(value: Any, field_path: str, default: dt.timedelta) -> dt.timedelta:
    parsed = _optional_duration(value, field_path)
    return default if parsed is None else parsed


def _bounded(value: dt.timedelta, field_path: str, bounds: tuple[dt.timedelta, dt.timedelta]) -> dt.timedelta:
    low, high = bounds
    if not low <= value <= high:
        raise SpecError(field_path, f"{format_duration(value)} is outside {format_duration(low)}-"
                                    f"{format_duration(high)}")
    return value


def parse_data_plane(value: Any, field_path: str) -> DataPlane | None:
    """None when absent (the next level's default applies); anything but a known data plane is refused."""
    if value is None:
        return None
    allowed = ", ".join(d.value for d in DataPlane)
    if not isinstance(value, str):
        raise SpecError(field_path, f"must be one of {allowed}, not {_kind(value)}")
    try:
        return DataPlane(value)
    except ValueError:
        raise SpecError(field_path, f"{value[:40]!r} is not a data plane: one of {allowed}") from None


def _algorithm(value: Any, field_path: str, default: KeyAlgorithm) -> KeyAlgorithm:
    if value is None:
        return default
    try:
        return KeyAlgorithm.parse(_string(value, field_path), field_path)
    except PKIError as exc:
        raise SpecError(field_path, exc.message) from None


def _milliseconds(value: dt.timedelta) -> int:
    """Whole milliseconds, as CEL's duration.getMilliseconds(): the CRDs' percentage rules compare these."""
    return value // dt.timedelta(milliseconds=1)


@dataclass(frozen=True)
class CertificatePolicy:
    default_ttl: dt.timedelta = DEFAULT_TTL
    min_ttl: dt.timedelta = DEFAULT_MIN_TTL
    max_ttl: dt.timedelta = DEFAULT_MAX_TTL
    default_key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM
    backdate: dt.timedelta = DEFAULT_BACKDATE
    allowed_dns_names: tuple[str, ...] = DEFAULT_ALLOWED_DNS_NAMES  # patterns; $(namespace) is the identity's


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
    workload_api: bool = False  # the default of its identities' spec.workloadAPI.enabled
    data_plane: DataPlane | None = None  # spec.sidecar.dataPlane; None: the operator's default

    def rotate_before(self, validity: dt.timedelta) -> dt.timedelta:
        return self.ca_rotate_before or validity * DEFAULT_CA_ROTATE_BEFORE_PERCENT / 100


def check_bundle_configmap_name(name: str, field_path: str = "spec.bundle.configMapName") -> str:
    """Refuse names whose ConfigMap someone else writes: meshtls would publish nothing there, or fight the owner."""
    if not 0 < len(name) <= MAX_OBJECT_NAME or not _DNS_LABEL.fullmatch(name.replace(".", "-")):
        raise SpecError(field_path, f"{name!r} is not a valid ConfigMap name (RFC 1123 subdomain)")
    if name in RESERVED_CONFIGMAP_NAMES or name.startswith(RESERVED_CONFIGMAP_PREFIX):
        raise SpecError(field_path, f"{name!r} is a ConfigMap Kubernetes or another system writes itself "
                                    f"({RESERVED_CONFIGMAP_PREFIX}* such as kube-root-ca.crt, "
                                    f"{', '.join(RESERVED_CONFIGMAP_NAMES)}): "
                                    "choose a name of meshtls's own, e.g. meshtls-bundle")
    if name.endswith(SIDECAR_CONFIG_SUFFIX):
        raise SpecError(field_path, f"{name!r} ends in {SIDECAR_CONFIG_SUFFIX}, the suffix of meshtls's sidecar "
                                    "configs: choose another name")
    return name


def _allowed_dns_names(value: Any, field_path: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_ALLOWED_DNS_NAMES
    patterns = _list(value, field_path)
    if len(patterns) > MAX_ALLOWED_DNS_NAMES:
        raise SpecError(field_path, f"has {len(patterns)} patterns, at most {MAX_ALLOWED_DNS_NAMES}")
    for i, pattern in enumerate(patterns):
        text = _string(pattern, f"{field_path}[{i}]")
        if len(text) > MAX_DNS_NAME_LENGTH or not _DNS_PATTERN.fullmatch(text):
            raise SpecError(f"{field_path}[{i}]", f"{text!r} is not a DNS name pattern: lowercase labels, "
                                                  f"{NAMESPACE_PLACEHOLDER}, * for one label, a leading ** for one "
                                                  "or more")
    return tuple(patterns)


def parse_trust_domain(body: Mapping[str, Any]) -> TrustDomainSpec:
    name = str(_get(body, "metadata", "name") or "")
    try:
        validate_trust_domain(name, "metadata.name")
    except PKIError as exc:
        raise SpecError(exc.field, exc.message) from None
    if len(name) > MAX_LABEL_VALUE:
        raise SpecError("metadata.name", f"may have at most {MAX_LABEL_VALUE} characters: meshtls labels its Secrets "
                                         "and ConfigMaps with the trust domain")
    spec = _spec(body, "TrustDomain")
    ca = _object(spec.get("ca"), "spec.ca")
    certs = _object(spec.get("certificates"), "spec.certificates")
    bundle = _object(spec.get("bundle"), "spec.bundle")
    crl = _object(spec.get("crl"), "spec.crl")
    sidecar = _object(spec.get("sidecar"), "spec.sidecar")
    min_ttl = _duration(certs.get("minTTL"), "spec.certificates.minTTL", DEFAULT_MIN_TTL)
    max_ttl = _duration(certs.get("maxTTL"), "spec.certificates.maxTTL", DEFAULT_MAX_TTL)
    default_ttl = _duration(certs.get("defaultTTL"), "spec.certificates.defaultTTL", DEFAULT_TTL)
    if min_ttl < ABSOLUTE_MIN_TTL:
        raise SpecError("spec.certificates.minTTL", f"must be at least {format_duration(ABSOLUTE_MIN_TTL)}")
    if max_ttl > MAX_WORKLOAD_TTL:
        raise SpecError("spec.certificates.maxTTL", f"must be at most {format_duration(MAX_WORKLOAD_TTL)}")
    if min_ttl > max_ttl:
        raise SpecError("spec.certificates.minTTL", "must not exceed spec.certificates.maxTTL")
    if not min_ttl <= default_ttl <= max_ttl:
        default_ttl = min(max(default_ttl, min_ttl), max_ttl) if certs.get("defaultTTL") is None else default_ttl
        if not min_ttl <= default_ttl <= max_ttl:
            raise SpecError("spec.certificates.defaultTTL",
                            f"{format_duration(default_ttl)} is outside minTTL-maxTTL "
                            f"({format_duration(min_ttl)}-{format_duration(max_ttl)})")
    backdate = _duration(certs.get("backdate"), "spec.certificates.backdate", DEFAULT_BACKDATE)
    if backdate > MAX_BACKDATE:
        raise SpecError("spec.certificates.backdate", f"{format_duration(backdate)} is over "
                                                      f"{format_duration(MAX_BACKDATE)} (clock skew is seconds)")
    secret_ref = _get(ca, "secretRef", "name")
    validity = _bounded(_duration(ca.get("validity"), "spec.ca.validity", DEFAULT_CA_VALIDITY), "spec.ca.validity",
                        CA_VALIDITY_RANGE)
    if not secret_ref and validity <= max_ttl:
        raise SpecError("spec.ca.validity", f"{format_duration(validity)} does not outlive a workload certificate "
                                            f"(spec.certificates.maxTTL {format_duration(max_ttl)}): a CA must live "
                                            "longer than the leaves it signs")
    propagation = _bounded(_duration(ca.get("propagationDelay"), "spec.ca.propagationDelay",
                                     DEFAULT_PROPAGATION_DELAY), "spec.ca.propagationDelay", PROPAGATION_DELAY_RANGE)
    rotate_before = _optional_duration(ca.get("rotateBefore"), "spec.ca.rotateBefore")
    if rotate_before is not None:
        if rotate_before <= propagation:
            raise SpecError("spec.ca.rotateBefore", f"{format_duration(rotate_before)} must be longer than "
                                                    f"spec.ca.propagationDelay ({format_duration(propagation)}): "
                                                    "the old CA would expire before the new one signs")
        if not secret_ref and _milliseconds(rotate_before) * 100 > _milliseconds(validity) * \
                MAX_CA_ROTATE_BEFORE_PERCENT:
            raise SpecError("spec.ca.rotateBefore", f"{format_duration(rotate_before)} is over "
                                                    f"{MAX_CA_ROTATE_BEFORE_PERCENT} % of spec.ca.validity "
                                                    f"({format_duration(validity)}): every new CA would start "
                                                    "inside its rotation window and rotate again")
    crl_validity = _bounded(_duration(crl.get("validity"), "spec.crl.validity", DEFAULT_CRL_VALIDITY),
                            "spec.crl.validity", CRL_VALIDITY_RANGE)
    if crl_validity < 2 * propagation:
        raise SpecError("spec.crl.validity", f"{format_duration(crl_validity)} is under twice "
                                             f"spec.ca.propagationDelay ({format_duration(propagation)}): a CRL "
                                             "re-signed at half its validity must reach every sidecar before it "
                                             "expires")
    configmap = check_bundle_configmap_name(_string(bundle.get("configMapName") or DEFAULT_BUNDLE_CONFIGMAP,
                                                    "spec.bundle.configMapName"))
    selector = _object(_get(bundle, "namespaceSelector"), "spec.bundle.namespaceSelector")
    return TrustDomainSpec(
        name=name,
        ca_secret_ref=str(secret_ref) if secret_ref else None,
        ca_key_algorithm=_algorithm(ca.get("keyAlgorithm"), "spec.ca.keyAlgorithm", DEFAULT_KEY_ALGORITHM),
        ca_validity=validity,
        ca_rotate_before=rotate_before,
        ca_propagation_delay=propagation,
        policy=CertificatePolicy(
            default_ttl=default_ttl,
            min_ttl=min_ttl,
            max_ttl=max_ttl,
            default_key_algorithm=_algorithm(certs.get("defaultKeyAlgorithm"),
                                             "spec.certificates.defaultKeyAlgorithm", DEFAULT_KEY_ALGORITHM),
            backdate=backdate,
            allowed_dns_names=_allowed_dns_names(certs.get("allowedDNSNames"), "spec.certificates.allowedDNSNames"),
        ),
        bundle_configmap=configmap,
        bundle_namespace_selector=dict(_object(selector.get("matchLabels"),
                                               "spec.bundle.namespaceSelector.matchLabels", "labels")),
        crl_validity=crl_validity,
        federates_with=tuple(dict(_object(f, f"spec.federatesWith[{i}]"))
                             for i, f in enumerate(_list(spec.get("federatesWith"), "spec.federatesWith"))),
        workload_api=bool(workload_api_enabled(spec.get("workloadAPI"))),
        data_plane=parse_data_plane(sidecar.get("dataPlane"), "spec.sidecar.dataPlane"),
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
    workload_api: bool | None = None  # spec.workloadAPI.enabled; None: the trust domain's default
    data_plane: DataPlane | None = None  # spec.dataPlane; None: the trust domain's or the operator's default

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
    workload_api: bool = False  # the pod gets the SPIFFE Workload API socket (docs/workload-api.md)

    @property
    def has_sidecar(self) -> bool:
        """Injected pods carry the sidecar for its routes, or for the Workload API alone."""
        return bool(self.spec.inbound or self.spec.outbound or self.workload_api)
    data_plane: DataPlane = DEFAULT_DATA_PLANE


def _inbound(value: Any) -> tuple[InboundPort, ...]:
    ports = []
    for i, item in enumerate(_list(value, "spec.inbound")):
        item = _object(item, f"spec.inbound[{i}]")
        port = _port(item.get("port"), f"spec.inbound[{i}].port")
        app_port = _port(item.get("appPort"), f"spec.inbound[{i}].appPort")
        if port == app_port:
            raise SpecError(f"spec.inbound[{i}].appPort", f"equals port {port}: port and appPort must differ")
        ports.append(InboundPort(port, app_port))
    return tuple(ports)


def _outbound(value: Any) -> tuple[OutboundUpstream, ...]:
    upstreams = []
    for i, item in enumerate(_list(value, "spec.outbound")):
        item = _object(item, f"spec.outbound[{i}]")
        listen_port = _port(item.get("listenPort"), f"spec.outbound[{i}].listenPort")
        address = _string(item.get("address"), f"spec.outbound[{i}].address")
        match = _ADDRESS.fullmatch(address)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise SpecError(f"spec.outbound[{i}].address", f"{address[:300]!r} must be host:port with a port "
                                                           "1-65535 (no leading zero)")
        peer = _string(item.get("peer"), f"spec.outbound[{i}].peer")
        try:
            parse_spiffe_id(peer[:-2] if peer.endswith("/*") else peer, f"spec.outbound[{i}].peer")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
        upstreams.append(OutboundUpstream(listen_port, address, peer))
    return tuple(upstreams)


def check_sidecar_ports(inbound: tuple[InboundPort, ...], outbound: tuple[OutboundUpstream, ...]) -> None:
    """The sidecar config as a whole: every port the sidecar, the app or meshtls's other container listens on in the
    pod is used once, and none is a reserved one (meshtls.api.ports, shared with the sidecar's own parser).

    The CRD refuses the same collisions with CEL (crds/workloadidentities.meshtls.dev.yaml); this names the item.
    """
    collision = port_collision([(r.port, r.app_port) for r in inbound], [u.listen_port for u in outbound],
                               RESERVED_PORTS, prefix="spec.")
    if collision:
        raise SpecError(collision.field, collision.message)


def workload_api_enabled(value: Any, field_path: str = "spec.workloadAPI") -> bool | None:
    """`workloadAPI: {enabled: true|false}`; None when absent (a WorkloadIdentity then follows its TrustDomain)."""
    if value is None:
        return None
    section = _object(value, field_path)
    unknown = sorted(set(section) - {"enabled"})
    if unknown:
        raise SpecError(f"{field_path}.{unknown[0]}", "is not a field of workloadAPI (it has only enabled)")
    enabled = section.get("enabled")
    if enabled is None:
        return None
    if not isinstance(enabled, bool):
        raise SpecError(f"{field_path}.enabled", f"must be true or false, not {_kind(enabled)}")
    return enabled


def _percent(value: Any) -> int | None:
    if value is None:
        return None
    low, high = RENEW_AT_PERCENT_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError("spec.renewAtPercent", f"{value!r} is not a whole percentage within {low}-{high}")
    return value


def parse_workload_identity(body: Mapping[str, Any]) -> WorkloadIdentitySpec:
    namespace = str(_get(body, "metadata", "namespace") or "")
    name = str(_get(body, "metadata", "name") or "")
    spec = _spec(body, "WorkloadIdentity", required=True)
    sa = spec.get("serviceAccountName")
    if sa is None or sa == "":
        raise SpecError("spec.serviceAccountName", "is required")
    sa = _string(sa, "spec.serviceAccountName")
    if len(sa) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in sa.split(".")):
        raise SpecError("spec.serviceAccountName", f"{sa[:300]!r} is not a valid ServiceAccount name (RFC 1123 "
                                                   "subdomain)")
    dns_names = tuple(_string(n, f"spec.dnsNames[{i}]") for i, n in enumerate(_list(spec.get("dnsNames"),
                                                                                       "spec.dnsNames")))
    for i, n in enumerate(dns_names):
        try:
            validate_dns_name(n, f"spec.dnsNames[{i}]")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    percent = _percent(spec.get("renewAtPercent"))
    renew_before = _optional_duration(spec.get("renewBefore"), "spec.renewBefore")
    if percent is not None and renew_before is not None:
        raise SpecError("spec.renewBefore", "set spec.renewBefore or spec.renewAtPercent, not both")
    ttl = _optional_duration(spec.get("ttl"), "spec.ttl")
    if ttl is not None:
        _bounded(ttl, "spec.ttl", (ABSOLUTE_MIN_TTL, MAX_WORKLOAD_TTL))
        if renew_before is not None:
            check_renew_before(renew_before, ttl)
    allowed = tuple(_string(p, f"spec.allowedPeers[{i}]")
                    for i, p in enumerate(_list(spec.get("allowedPeers"), "spec.allowedPeers")))
    for i, pattern in enumerate(allowed):
        try:
            if pattern != "*":
                parse_spiffe_id(pattern[:-2] if pattern.endswith("/*") else pattern, f"spec.allowedPeers[{i}]")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    td = spec.get("trustDomain")
    if td is not None and td != "":
        try:
            validate_trust_domain(_string(td, "spec.trustDomain"), "spec.trustDomain")
        except PKIError as exc:
            raise SpecError(exc.field, exc.message) from None
    secret_name = _string(spec.get("secretName") or default_secret_name(name), "spec.secretName")
    if not _OBJECT_NAME.fullmatch(secret_name):
        raise SpecError("spec.secretName", f"{secret_name[:60]!r} is not a valid Secret name (lowercase RFC 1123 "
                                           "subdomain)")
    if len(secret_name) > MAX_OBJECT_NAME:
        raise SpecError("spec.secretName", f"the Secret name {secret_name[:40]}... would have {len(secret_name)} "
                                           f"characters (at most {MAX_OBJECT_NAME}): set a shorter spec.secretName")
    inbound, outbound = _inbound(spec.get("inbound")), _outbound(spec.get("outbound"))
    check_sidecar_ports(inbound, outbound)
    workload_api = workload_api_enabled(spec.get("workloadAPI"))
    if inbound or outbound or workload_api:
        check_sidecar_configmap_name(name)
    selector = _object(spec.get("podSelector"), "spec.podSelector")
    return WorkloadIdentitySpec(
        namespace=namespace,
        name=name,
        service_account=sa,
        trust_domain=str(td) if td else None,
        dns_names=dns_names,
        ttl=ttl,
        renew_before=renew_before,
        renew_at_percent=float(percent) if percent is not None else None,
        key_algorithm=_algorithm(spec.get("keyAlgorithm"), "spec.keyAlgorithm", DEFAULT_KEY_ALGORITHM)
        if spec.get("keyAlgorithm") is not None else None,
        secret_name=secret_name,
        pod_selector=dict(_object(selector.get("matchLabels"), "spec.podSelector.matchLabels", "labels")),
        inbound=inbound,
        outbound=outbound,
        allowed_peers=allowed,
        workload_api=workload_api,
        data_plane=parse_data_plane(spec.get("dataPlane"), "spec.dataPlane"),
    )


def check_sidecar_configmap_name(name: str) -> None:
    """An identity with a sidecar gets the ConfigMap <name>-meshtls-proxy; cut to the name limit it could be another
    identity's (or no valid name at all), so a name too long for it is refused."""
    if len(name + SIDECAR_CONFIG_SUFFIX) > MAX_OBJECT_NAME:
        raise SpecError("metadata.name", f"the sidecar ConfigMap {name[:40]}...{SIDECAR_CONFIG_SUFFIX} would exceed "
                                         f"{MAX_OBJECT_NAME} characters: use a shorter name")


def check_renew_before(renew_before: dt.timedelta, ttl: dt.timedelta) -> None:
    """renewBefore must put the renewal between 10 % and 95 % of the lifetime: 5 %-90 % of the TTL before expiry."""
    low, high = RENEW_BEFORE_PERCENT_RANGE
    before, lifetime = _milliseconds(renew_before), _milliseconds(ttl)
    if not low * lifetime <= 100 * before <= high * lifetime:
        raise SpecError("spec.renewBefore", f"{format_duration(renew_before)} is {100 * before / lifetime:.0f} % of "
                                            f"the ttl {format_duration(ttl)}; it must lie within {low}-{high} % of "
                                            f"it ({format_duration(ttl * low / 100)}-"
                                            f"{format_duration(ttl * high / 100)}), so that renewal falls between "
                                            f"{100 - high} % and {100 - low} % of the lifetime")


def dns_name_patterns(patterns: tuple[str, ...], namespace: str) -> tuple[str, ...]:
    return tuple(p.replace(NAMESPACE_PLACEHOLDER, namespace) for p in patterns)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for i, label in enumerate(pattern.split(".")):
        if label == "**" and i == 0:
            parts.append(r"[^.]+(\.[^.]+)*")
        elif label == "*":
            parts.append(r"[^.]+")  # one label, which may itself be a name's wildcard label
        else:
            parts.append(re.escape(label))
    return re.compile(r"\.".join(parts))


def dns_name_allowed(name: str, namespace: str, patterns: tuple[str, ...]) -> bool:
    return any(_pattern_regex(p).fullmatch(name) for p in dns_name_patterns(patterns, namespace))


def resolve_identity(spec: WorkloadIdentitySpec, td: TrustDomainSpec,
                     default_data_plane: DataPlane = DEFAULT_DATA_PLANE) -> EffectiveIdentity:
    """Apply the trust domain's defaults (and the operator's, for the data plane) and check what only the trust
    domain can bound (TTL range, renewal point, DNS names)."""
    policy = td.policy
    ttl = spec.ttl or policy.default_ttl
    if not policy.min_ttl <= ttl <= policy.max_ttl:
        raise SpecError("spec.ttl", f"{format_duration(ttl)} is outside the trust domain's range "
                                    f"{format_duration(policy.min_ttl)}-{format_duration(policy.max_ttl)}",
                        reason=Reason.TTL_OUT_OF_RANGE)
    if spec.renew_before is not None:
        check_renew_before(spec.renew_before, ttl)
    for i, dns_name in enumerate(spec.dns_names):
        if not dns_name_allowed(dns_name, spec.namespace, policy.allowed_dns_names):
            allowed = ", ".join(dns_name_patterns(policy.allowed_dns_names, spec.namespace)) or "no DNS names"
            raise SpecError(f"spec.dnsNames[{i}]", f"{dns_name!r} is outside what TrustDomain {td.name} allows in "
                                                   f"namespace {spec.namespace}: {allowed} "
                                                   "(spec.certificates.allowedDNSNames)",
                            reason=Reason.DNS_NAME_NOT_ALLOWED)
    identity = EffectiveIdentity(
        spec=spec,
        trust_domain=td.name,
        spiffe_id=spec.spiffe_id(td.name),
        ttl=ttl,
        key_algorithm=spec.key_algorithm or policy.default_key_algorithm,
        renew_before=spec.renew_before,
        renew_at_fraction=(spec.renew_at_percent or DEFAULT_RENEW_AT_PERCENT) / 100,
        # a 20 s certificate backdated by a minute would be mostly in the past: cap at a quarter of the TTL
        backdate=min(policy.backdate, ttl / 4),
        workload_api=td.workload_api if spec.workload_api is None else spec.workload_api,
        data_plane=choose_data_plane(spec.data_plane, td.data_plane, default_data_plane),
    )
    if identity.has_sidecar:  # the TrustDomain's Workload API default may give it a sidecar the spec does not ask for
        check_sidecar_configmap_name(spec.name)
    return identity
