"""Event and condition reasons users see (`kubectl get events --field-selector reason=Rotated`), in one place.

A StrEnum: a member is the string it names, so code comparing with the literal keeps working.
"""

from __future__ import annotations

from enum import StrEnum, unique


@unique
class ConditionType(StrEnum):
    READY = "Ready"
    ISSUING = "Issuing"
    CA_EXPIRING = "CAExpiring"
    FEDERATED = "Federated"
    BUNDLE_PUBLISHED = "BundlePublished"
    DEFAULT_TRUST_DOMAIN = "DefaultTrustDomain"


@unique
class Reason(StrEnum):
    # a certificate written (Events on the WorkloadIdentity, the Ready condition)
    ISSUED = "Issued"
    ROTATED = "Rotated"
    REPAIRED = "Repaired"
    REVOKED = "Revoked"
    SUPERSEDED = "Superseded"
    # why a certificate is (re-)issued: the first check of policy.triggers that fires
    REVOKE_REQUESTED = "RevokeRequested"
    RENEW_REQUESTED = "RenewRequested"
    SPEC_CHANGED = "SpecChanged"
    SECRET_MISSING = "SecretMissing"
    SECRET_INVALID = "SecretInvalid"
    SECRET_TAMPERED = "SecretTampered"
    CA_CHANGED = "CAChanged"
    EXPIRED = "Expired"
    RENEWAL_DUE = "RenewalDue"
    # why nothing is issued
    READY = "Ready"
    RENEWAL_FLOOR = "RenewalFloor"
    SECRET_CONFLICT = "SecretConflict"
    # a spec meshtls cannot act on
    INVALID_SPEC = "InvalidSpec"
    INVALID_SECRET = "InvalidSecret"
    TTL_OUT_OF_RANGE = "TTLOutOfRange"
    DNS_NAME_NOT_ALLOWED = "DNSNameNotAllowed"
    CONFIG_CONFLICT = "ConfigConflict"
    SIDECAR_CONFIG_TOO_LARGE = "SidecarConfigTooLarge"
    SIDECAR_CONFIG_REFUSED = "SidecarConfigRefused"
    OVERLAPPING = "Overlapping"
    # the injector (Warning Events on pods it admitted without a sidecar)
    IDENTITY_NOT_FOUND = "IdentityNotFound"
    IDENTITY_AMBIGUOUS = "IdentityAmbiguous"
    # trust domains
    CA_READY = "CAReady"
    CA_VALID = "CAValid"
    CA_IN_ROTATION_WINDOW = "CAInRotationWindow"
    CA_ROTATION_STARTED = "CARotationStarted"
    CA_ROTATED = "CARotated"
    CA_RETIRED = "CARetired"
    CA_INVALID = "CAInvalid"
    CA_SECRET_MISSING = "CASecretMissing"
    STATE_SECRET_CONFLICT = "StateSecretConflict"
    UNKNOWN_TRUST_DOMAIN = "UnknownTrustDomain"
    FEDERATION_BUNDLE_MISSING = "FederationBundleMissing"
    FEDERATION_BUNDLES_LOADED = "FederationBundlesLoaded"
    CA_STATE_RESTORED = "CAStateRestored"
    PUBLISHED = "Published"
    BUNDLE_CONFLICT = "BundleConflict"
    DEFAULT = "Default"
    MULTIPLE_DEFAULTS = "MultipleDefaults"
    # deleting an identity whose trust domain can no longer sign a CRL
    TRUST_DOMAIN_GONE = "TrustDomainGone"
    REVOCATION_SKIPPED = "RevocationSkipped"


# what `meshtls watch` follows by default: a certificate written, revoked or refused for a foreign Secret
WATCHED_REASONS = (Reason.ISSUED, Reason.ROTATED, Reason.REVOKED, Reason.REPAIRED, Reason.SECRET_CONFLICT)
