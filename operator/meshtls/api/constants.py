"""Names shared by the CRDs, the operator, the webhook and the CLI."""

GROUP = "meshtls.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TRUST_DOMAINS = "trustdomains"
WORKLOAD_IDENTITIES = "workloadidentities"
KIND_TRUST_DOMAIN = "TrustDomain"
KIND_WORKLOAD_IDENTITY = "WorkloadIdentity"

# Labels and annotations meshtls puts on what it owns; a Secret without them is never touched.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "meshtls"
LABEL_IDENTITY = f"{GROUP}/identity"  # the WorkloadIdentity's name, on its Secret
LABEL_TRUST_DOMAIN = f"{GROUP}/trust-domain"
LABEL_BUNDLE = f"{GROUP}/bundle"
ANNOTATION_TRUST_DOMAINS = f"{GROUP}/trust-domains"  # on a bundle: every trust domain it carries, comma-separated
ANNOTATION_DEFAULT_TRUST_DOMAIN = f"{GROUP}/default-trust-domain"  # "true" on the TrustDomain identities default to
ANNOTATION_SPIFFE_ID = f"{GROUP}/spiffe-id"
ANNOTATION_SERIAL = f"{GROUP}/serial"
ANNOTATION_NOT_AFTER = f"{GROUP}/not-after"
ANNOTATION_OWNER_UID = f"{GROUP}/owner-uid"
ANNOTATION_REVOKE = f"{GROUP}/revoke"  # set by a user (or `meshtls revoke`): revoke now, reason as value
ANNOTATION_RENEW = f"{GROUP}/renew"  # set by `meshtls renew`: re-issue now; the value is a request id

# Injection opt-in (namespace label or pod label) and the pod annotations the webhook writes.
LABEL_INJECT_NAMESPACE = f"{GROUP}/inject"  # = enabled
LABEL_INJECT_POD = f"{GROUP}/inject"  # = true
ANNOTATION_INJECTED = f"{GROUP}/injected-identity"

FINALIZER = f"{GROUP}/revoke-on-delete"
DEFAULT_BUNDLE_CONFIGMAP = "meshtls-bundle"
ANNOTATION_ROTATE_CA = f"{GROUP}/rotate-ca"  # set by `meshtls ca rotate`: start a CA rotation now

# Names of the objects meshtls writes: meshtls.api.names. Event and condition reasons: meshtls.api.reasons.
