"""Hostile and bad input (issue #8): a corpus of invalid TrustDomains and WorkloadIdentities, and unusable CAs a
user might bring. Each bad object is refused by the API server naming the field, or accepted and then reported by
the operator as Ready=False with a specific reason within 10 s; the operator neither crashes nor spins.

The corpus is e2e/manifests/hostile/*.yaml. Each file starts with comment lines:
  `# expect: TEXT`          the API server refuses it and kubectl's error contains TEXT (the field), or
  `# expect-reason: REASON` it is accepted and ends Ready=False with that reason,
  `# expect-message: TEXT`  ... and a condition message containing TEXT,
  `# namespace: NS`         created in NS instead of the test's namespace,
  `# why: ...`              what it tries,
  `# field: PATH`           the field meshtls.api.model names for it (tests/test_spec_bounds.py runs the corpus
                            through the model: CRDs can be older than the operator).
`__TD__` is replaced by the test's trust domain (minTTL 1m, maxTTL 2h), `__RUN__` by a suffix unique to the run.
Admission webhook input is fuzzed separately, without a cluster: tests/test_admission_fuzz.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.harness import Cluster
from e2e.kube_helpers import GROUP, VERSION, Kube, is_ready, ready_condition, wait_for
from e2e.operator_process import OperatorProcess
from meshtls.api.model import SpecError, parse_trust_domain, parse_workload_identity
from meshtls.pki import generate_ca, issue_svid, workload_spiffe_id

CORPUS = Path(__file__).parent / "manifests" / "hostile"
OPERATOR_NAMESPACE = "meshtls-system"
REPORT_WITHIN = 10.0  # seconds from creation to a Ready=False condition
IDLE_WINDOW = 20.0  # seconds of quiet after the corpus, over which the operator's CPU time is measured
# CPU seconds in that window: 10 % of one core. A spinning reconcile loop burns most of a core (~20 s); the quiet
# operator measures 0.01-0.14 s, and 0.56 s was seen once on a loaded machine, so 1 % (issue #13's first bound) flaked.
IDLE_CPU_BOUND = 2.0
CRDS = Path(__file__).parent.parent / "crds"


def cel_messages() -> list[str]:
    """The message of every CEL rule in the CRDs: each must be seen refusing a corpus case."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend(rule["message"] for rule in node.get("x-kubernetes-validations") or [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(CRDS.glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return found


@dataclass
class Case:
    path: Path
    text: str
    expect: str | None = None
    reason: str | None = None
    message: str | None = None
    namespace: str | None = None
    why: str = ""
    kind: str = ""
    name: str = ""
    created_at: float | None = None
    outcome: str = ""
    detail: str = ""
    problems: list[str] = field(default_factory=list)


def load_corpus(trust_domain: str, run: str) -> list[Case]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        text = path.read_text().replace("__TD__", trust_domain).replace("__RUN__", run)
        case = Case(path, text)
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            key, _, value = line[1:].strip().partition(":")
            value = value.strip()
            if key == "expect":
                case.expect = value
            elif key == "expect-reason":
                case.reason = value
            elif key == "expect-message":
                case.message = value
            elif key == "namespace":
                case.namespace = value
            elif key == "why":
                case.why = value
        doc = yaml.safe_load(text)
        case.kind, case.name = doc["kind"], str(doc["metadata"]["name"])
        assert (case.expect is None) != (case.reason is None), f"{path.name}: one of expect / expect-reason"
        cases.append(case)
    return cases


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_object(kube: Kube, case: Case, namespace: str) -> dict[str, Any] | None:
    try:
        if case.kind == "TrustDomain":
            return dict(kube.custom.get_cluster_custom_object(GROUP, VERSION, "trustdomains", case.name))
        return dict(kube.custom.get_namespaced_custom_object(GROUP, VERSION, case.namespace or namespace,
                                                              "workloadidentities", case.name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_object(kube: Kube, kind: str, name: str, namespace: str | None = None) -> None:
    try:
        if kind == "TrustDomain":
            kube.custom.delete_cluster_custom_object(GROUP, VERSION, "trustdomains", name)
        elif kind == "WorkloadIdentity":
            kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities", name)
        elif kind == "Secret":
            kube.core.delete_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def plain_secret(kube: Kube, namespace: str, name: str, data: dict[str, bytes],
                 type_: str = "Opaque") -> client.V1Secret:
    return kube.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), type=type_,
        data={k: base64.b64encode(v).decode() for k, v in data.items()}))


@pytest.fixture
def hostile_td(kube: Kube, running_operator: OperatorProcess) -> Iterator[str]:
    """A trust domain with a narrow TTL range (1m-2h), so TTLs the CRD allows can still be out of range."""
    name = f"hostile-{uuid.uuid4().hex[:6]}.e2e.test"
    kube.create_trust_domain(name, {"certificates": {"minTTL": "1m", "defaultTTL": "1h", "maxTTL": "2h"}})
    try:
        wait_for("the hostile TrustDomain Ready", lambda: is_ready(kube.trust_domain(name)), 30)
        yield name
    finally:
        delete_object(kube, "TrustDomain", name)
        delete_object(kube, "Secret", f"meshtls-ca-{name}", OPERATOR_NAMESPACE)


@pytest.mark.timeout(240)
def test_hostile_corpus_is_refused_or_reported_and_the_operator_stays_calm(
    cluster: Cluster, kube: Kube, trust_domain: str, hostile_td: str, running_operator: OperatorProcess,
    namespace: str,
) -> None:
    run = uuid.uuid4().hex[:6]
    cases = load_corpus(hostile_td, run)
    refused = [c for c in cases if c.expect]
    reported = [c for c in cases if c.reason]
    assert len(cases) >= 50 and len(refused) >= 40 and len(reported) >= 10, (len(refused), len(reported))
    assert running_operator.proc is not None
    pid = running_operator.proc.pid
    cpu_before = cpu_seconds(pid)
    # what the conflicting cases collide with
    kube.create_identity(namespace, "owner", {"serviceAccountName": "owner", "trustDomain": hostile_td})
    wait_for("owner Ready", lambda: is_ready(kube.identity(namespace, "owner")), 15)
    owner_secret = kube.core.read_namespaced_secret("owner-mtls", namespace)
    plain_secret(kube, namespace, "db-credentials", {"password": b"hunter2"})
    kube.core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="squatter-meshtls-proxy"), data={"proxy.yaml": "mine"}))
    extra_secrets = [f"meshtls-ca-h-squat-{run}.example", f"empty-ca-{run}"]
    plain_secret(kube, OPERATOR_NAMESPACE, extra_secrets[0], {"note": b"not meshtls's"})
    plain_secret(kube, OPERATOR_NAMESPACE, extra_secrets[1], {"readme": b"the CA goes here"})
    ca_state_before = kube.core.read_namespaced_secret(f"meshtls-ca-{hostile_td}", OPERATOR_NAMESPACE)
    webhook_tls_before = kube.core.read_namespaced_secret("meshtls-webhook-tls", OPERATOR_NAMESPACE)

    def submit(case: Case) -> None:
        result = cluster.kubectl("create", "-n", case.namespace or namespace, "-f", "-", input=case.text,
                                 check=False)
        case.detail = result.stderr.strip()
        if case.expect:
            if result.returncode == 0:
                case.problems.append(f"accepted: {result.stdout.strip()}")
            elif case.expect not in result.stderr:
                case.problems.append(f"refused without {case.expect!r}: {result.stderr.strip()[:300]}")
            case.outcome = "refused"
        elif result.returncode != 0:
            case.problems.append(f"refused, expected {case.reason}: {result.stderr.strip()[:300]}")
        else:
            case.created_at = time.monotonic()

    started = time.monotonic()
    try:
        pool = ThreadPoolExecutor(4)
        list(pool.map(submit, reported))  # the accepted ones first: their 10 s start at their creation
        pending = [c for c in reported if c.created_at is not None]
        rest = pool.map(submit, refused)  # meanwhile the API server refuses the others
        while pending:
            for case in list(pending):
                assert case.created_at is not None
                cond = ready_condition(get_object(kube, case, namespace))
                if cond.get("status") == "False" and cond.get("reason") == case.reason:
                    case.outcome = f"{case.reason} in {time.monotonic() - case.created_at:.1f} s"
                    case.detail = cond.get("message", "")
                    if case.message and case.message not in case.detail:
                        case.problems.append(f"message {case.detail!r} lacks {case.message!r}")
                    pending.remove(case)
                elif time.monotonic() - case.created_at > REPORT_WITHIN:
                    case.problems.append(f"no Ready=False {case.reason} within {REPORT_WITHIN:.0f} s: {cond}")
                    pending.remove(case)
            time.sleep(0.25)
        list(rest)
        pool.shutdown()
        corpus_time = time.monotonic() - started
        assert running_operator.running and running_operator.proc.pid == pid, "the operator crashed or restarted"
        cpu_corpus = cpu_seconds(pid) - cpu_before
        idle_start = cpu_seconds(pid)
        time.sleep(IDLE_WINDOW)
        idle_cpu = cpu_seconds(pid) - idle_start
        assert running_operator.running and running_operator.proc.pid == pid, "the operator crashed or restarted"
        # the collisions left everything they aimed at alone
        owner_after = kube.core.read_namespaced_secret("owner-mtls", namespace)
        ca_state_after = kube.core.read_namespaced_secret(f"meshtls-ca-{hostile_td}", OPERATOR_NAMESPACE)
        webhook_tls_after = kube.core.read_namespaced_secret("meshtls-webhook-tls", OPERATOR_NAMESPACE)
        untouched = [(owner_secret, owner_after), (ca_state_before, ca_state_after),
                     (webhook_tls_before, webhook_tls_after)]
        for before, after in untouched:
            assert after.data == before.data and after.metadata.resource_version == before.metadata.resource_version, \
                f"{before.metadata.name} was written"
        # ... and deleting the identities that aimed at the operator's own Secrets leaves those Secrets alone too
        squatters = [c for c in reported if c.namespace == OPERATOR_NAMESPACE and c.created_at is not None]
        for case in squatters:
            delete_object(kube, case.kind, case.name, case.namespace)
        for case in squatters:
            wait_for(f"{case.name} deleted", lambda c=case: get_object(kube, c, namespace) is None, 15)
        for before, _ in untouched[1:]:
            after = kube.core.read_namespaced_secret(before.metadata.name, OPERATOR_NAMESPACE)
            assert after.data == before.data and after.metadata.resource_version == before.metadata.resource_version, \
                f"deleting a squatting identity touched {before.metadata.name}"
        problems = [f"{c.path.name} ({c.why}): {p}" for c in cases for p in c.problems]
        if os.environ.get("HOSTILE_DEBUG"):  # one line per case: file, outcome, the message seen
            for c in cases:
                print(c.path.name, "|", c.outcome, "|", c.detail[:230].replace("\n", " / "))
        slowest = max((float(c.outcome.split(" in ")[1][:-2]) for c in reported if " in " in c.outcome), default=0)
        refusals = "\n".join(c.detail for c in refused)
        unexercised = [m for m in cel_messages() if m not in refusals]
        print(f"\nfigures: hostile corpus: {len(cases)} manifests, {len(refused)} refused by the API server naming "
              f"the field, {len(reported)} accepted and reported Ready=False (slowest {slowest:.1f} s); "
              f"{len(problems)} problems; operator pid {pid} unchanged, CPU {cpu_corpus:.1f} s over the corpus "
              f"({corpus_time:.0f} s), {idle_cpu:.2f} s over {IDLE_WINDOW:.0f} s idle after it "
              f"(bound {IDLE_CPU_BOUND} s)")
        print(f"figures: idle operator CPU after the hostile corpus: {idle_cpu:.3f} CPU-s over {IDLE_WINDOW:.0f} s")
        assert not problems, "\n".join(problems)
        assert not unexercised, f"CEL rules no corpus case shows refusing: {unexercised}"
        assert idle_cpu < IDLE_CPU_BOUND, f"the operator burns {idle_cpu:.2f} CPU s in {IDLE_WINDOW:.0f} s idle"
    finally:
        for case in reported:
            if case.created_at is not None:
                delete_object(kube, case.kind, case.name, case.namespace or namespace)
        for name in extra_secrets:
            delete_object(kube, "Secret", name, OPERATOR_NAMESPACE)


# --- CAs a user might bring that cannot work ---------------------------------------------------------------------

HOUR = dt.timedelta(hours=1)


def _ca_cert(subject: str, key: Any, issuer: x509.Name | None, signer: Any, now: dt.datetime,
             not_after: dt.datetime, ca: bool = True) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - HOUR).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def unusable_cas(trust_domain: str) -> dict[str, tuple[dict[str, bytes], str]]:
    """name -> (Secret data, text the condition message must contain)."""
    now = dt.datetime.now(dt.UTC)
    good = generate_ca(trust_domain, now)
    other = generate_ca(trust_domain, now)
    leaf = issue_svid(good, workload_spiffe_id(trust_domain, "default", "web"), now, HOUR)
    weak = rsa.generate_private_key(65537, 1024)
    old_key = ec.generate_private_key(ec.SECP256R1())
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert("team intermediate", inter_key, good.certificate.subject, good.key, now, now + 24 * HOUR)
    return {
        "not-a-ca": ({"tls.crt": leaf.cert_chain_pem, "tls.key": leaf.key_pem}, "is not a CA"),
        "key-mismatch": ({"tls.crt": good.certificate_pem(), "tls.key": other.key_pem()}, "does not match"),
        "expired": ({"tls.crt": _pem(_ca_cert("old CA", old_key, None, old_key, now - 48 * HOUR, now - HOUR)),
                     "tls.key": _key_pem(old_key)}, "expired"),
        "rsa-1024": ({"tls.crt": _pem(_ca_cert("weak CA", weak, None, weak, now, now + 24 * HOUR)),
                      "tls.key": _key_pem(weak)}, "too weak"),
        "chain-does-not-link": ({"tls.crt": _pem(inter) + other.certificate_pem(), "tls.key": _key_pem(inter_key)},
                                "does not link"),
        "intermediate-without-chain": ({"tls.crt": _pem(inter), "tls.key": _key_pem(inter_key)}, "needs its chain"),
        "garbage": ({"tls.crt": b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
                     "tls.key": good.key_pem()}, "ca.crt"),
    }


@pytest.mark.timeout(120)
def test_unusable_brought_cas_are_reported_as_ca_invalid(kube: Kube, running_operator: OperatorProcess) -> None:
    run = uuid.uuid4().hex[:6]
    cases = unusable_cas(f"byo.{run}.example")
    created: list[tuple[str, str]] = []
    try:
        started = time.monotonic()
        for case, (data, _) in cases.items():
            secret, td = f"byo-{case}-{run}", f"byo-{case}-{run}.example"
            plain_secret(kube, OPERATOR_NAMESPACE, secret, data, type_="kubernetes.io/tls"
                         if case != "garbage" else "Opaque")
            kube.create_trust_domain(td, {"ca": {"secretRef": {"name": secret}}})
            created.append((secret, td))
        seen: dict[str, str] = {}

        def all_reported() -> bool:
            for case, (_, td) in zip(cases, created, strict=True):
                cond = ready_condition(kube.trust_domain(td))
                if cond.get("status") == "False" and cond.get("reason") == "CAInvalid":
                    seen[case] = cond.get("message", "")
            return len(seen) == len(cases)

        wait_for("every brought CA reported CAInvalid", all_reported, 20, interval=0.5)
        elapsed = time.monotonic() - started
        for case, (_, expected) in cases.items():
            assert expected in seen[case], f"{case}: {seen[case]!r} does not say {expected!r}"
            assert f"byo-{case}-{run}" in seen[case], f"{case}: the message does not name the Secret: {seen[case]!r}"
        for _, td in created:  # no state (no CA key) was made from a bad CA
            with pytest.raises(ApiException):
                kube.core.read_namespaced_secret(f"meshtls-ca-{td}", OPERATOR_NAMESPACE)
        print(f"\nfigures: {len(cases)} unusable brought CAs ({', '.join(cases)}) all CAInvalid, naming the problem, "
              f"within {elapsed:.1f} s")
    finally:
        for secret, td in created:
            delete_object(kube, "TrustDomain", td)
            delete_object(kube, "Secret", secret, OPERATOR_NAMESPACE)
            delete_object(kube, "Secret", f"meshtls-ca-{td}", OPERATOR_NAMESPACE)


# --- valid but extreme names ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_60_character_trust_domain_gets_a_ca(kube: Kube, running_operator: OperatorProcess) -> None:
    """SPIFFE trust domains may be long; a CA's CN may not (64): the operator must not put one into the other."""
    name = f"t{uuid.uuid4().hex[:6]}.payments.eu-west-1.long-trust-domain-name.example.test"
    assert 54 <= len(name) <= 63, len(name)
    kube.create_trust_domain(name, {})
    try:
        wait_for(f"TrustDomain {name} Ready", lambda: is_ready(kube.trust_domain(name)), 20)
    finally:
        delete_object(kube, "TrustDomain", name)
        delete_object(kube, "Secret", f"meshtls-ca-{name}", OPERATOR_NAMESPACE)


def condition_within(read: Any, seconds: float) -> dict[str, Any]:
    """The Ready condition once there is one, or {} after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cond = ready_condition(read())
        if cond:
            return cond
        time.sleep(0.25)
    return {}


@pytest.mark.timeout(60)
def test_a_trust_domain_name_over_63_characters_is_refused_or_reported(
    cluster: Cluster, kube: Kube, running_operator: OperatorProcess,
) -> None:
    """Guards defect 2 of docs/reliability.md (fixed: names over 63 characters are refused)."""
    name = f"t{uuid.uuid4().hex[:6]}." + "x" * 64 + ".example"
    result = cluster.kubectl("create", "-f", "-", check=False, input=(
        f"apiVersion: meshtls.dev/v1alpha1\nkind: TrustDomain\nmetadata: {{name: {name}}}\nspec: {{}}\n"))
    if result.returncode != 0:
        assert "metadata.name" in result.stderr, result.stderr
        return
    try:
        cond = condition_within(lambda: kube.trust_domain(name), 15)
    finally:
        delete_object(kube, "TrustDomain", name)
        delete_object(kube, "Secret", f"meshtls-ca-{name}", OPERATOR_NAMESPACE)
    if not cond:
        pytest.fail("accepted, and no condition after 15 s (defect 2 of docs/reliability.md is back)")
    assert cond["status"] == "True" or cond.get("reason"), cond


@pytest.mark.timeout(60)
def test_an_identity_whose_secret_name_would_be_too_long_is_reported(
    kube: Kube, trust_domain: str, running_operator: OperatorProcess, namespace: str,
) -> None:
    """Guards defect 3 of docs/reliability.md (fixed: Ready=False naming spec.secretName)."""
    name = "n" * 250  # a valid object name; "<name>-mtls" is not a valid Secret name
    try:
        kube.create_identity(namespace, name, {"serviceAccountName": "web", "trustDomain": trust_domain})
    except ApiException as exc:  # refused by the API server (a CEL rule): fine if it says why
        assert exc.status == 422 and ("secretName" in str(exc.body) or "metadata.name" in str(exc.body)), exc.body
        return
    cond = condition_within(lambda: kube.identity(namespace, name), 10)
    if not cond:
        pytest.fail("no condition after 10 s (defect 3 of docs/reliability.md is back)")
    assert cond["status"] == "False" and "secretName" in cond["message"], cond


# --- the namespace is the isolation boundary for DNS names (issue #13) ---------------------------------------------


@pytest.mark.timeout(90)
def test_a_trust_domains_dns_policy_is_served_and_enforced(
    kube: Kube, trust_domain: str, running_operator: OperatorProcess, namespace: str,
) -> None:
    """allowedDNSNames reaches the operator (not pruned by the API server) and replaces the default policy; the
    default (the e2e trust domain has none) allows the namespace's own Service and pod names, wildcards included."""
    run = uuid.uuid4().hex[:6]
    td = f"dns-{run}.e2e.test"
    own = [f"web.{namespace}.svc", f"*.{namespace}.svc.cluster.local", f"web-0.web.{namespace}.svc.cluster.local",
           "web", f"web.{namespace}"]
    kube.create_trust_domain(td, {"certificates": {"minTTL": "10s",
                                                   "allowedDNSNames": ["**.example.com", "*.$(namespace).svc"]}})
    try:
        wait_for("the TrustDomain Ready", lambda: is_ready(kube.trust_domain(td)), 30)
        kube.create_identity(namespace, "own", {"serviceAccountName": "own", "trustDomain": trust_domain,
                                                "dnsNames": own})
        kube.create_identity(namespace, "listed", {"serviceAccountName": "listed", "trustDomain": td,
                                                   "dnsNames": ["api.example.com", "a.b.example.com",
                                                                f"web.{namespace}.svc"]})
        kube.create_identity(namespace, "unlisted", {"serviceAccountName": "unlisted", "trustDomain": td,
                                                     "dnsNames": [f"web.{namespace}.svc.cluster.local"]})
        kube.create_identity(namespace, "foreign", {"serviceAccountName": "foreign", "trustDomain": trust_domain,
                                                    "dnsNames": ["web", "api.kube-system.svc"]})
        for name in ("own", "listed"):
            wait_for(f"{name} Ready", lambda n=name: is_ready(kube.identity(namespace, n)), 20)
        for name, sans in (("own", own), ("listed", ["api.example.com", "a.b.example.com", f"web.{namespace}.svc"])):
            data = kube.secret_data(namespace, f"{name}-mtls")
            assert data is not None
            cert = x509.load_pem_x509_certificate(data["tls.crt"])
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sorted(names.get_values_for_type(x509.DNSName)) == sorted(sans)
        for name, field_path, needle in (("unlisted", "spec.dnsNames[0]", f"*.{namespace}.svc"),
                                         ("foreign", "spec.dnsNames[1]", f"*.{namespace}")):
            cond = wait_for(f"{name} DNSNameNotAllowed", lambda n=name: (
                c if (c := ready_condition(kube.identity(namespace, n))).get("reason") == "DNSNameNotAllowed"
                else None), 10)
            assert cond["status"] == "False" and field_path in cond["message"] and needle in cond["message"], cond
            assert kube.secret_data(namespace, f"{name}-mtls") is None, f"{name}: a certificate was minted anyway"
    finally:
        for name in ("own", "listed", "unlisted", "foreign"):
            delete_object(kube, "WorkloadIdentity", name, namespace)
        for name in ("own", "listed", "unlisted", "foreign"):  # revoked under their trust domain before it goes
            wait_for(f"{name} deleted", lambda n=name: kube.identity(namespace, n) is None, 30)
        delete_object(kube, "TrustDomain", td)
        delete_object(kube, "Secret", f"meshtls-ca-{td}", OPERATOR_NAMESPACE)


# --- the API server and the model judge specs alike (issue #13: CRDs can be older than the operator) ----------------

DIFFERENTIAL_SPECS = 300  # of each kind; dry-run requests, a few seconds in all


def _maybe(rng: random.Random, values: list[Any]) -> Any:
    """Mostly absent, so that a spec holds one or two values at a time and about half the specs pass."""
    return rng.choice(values) if rng.random() < 0.3 else None


def random_identity_spec(rng: random.Random, trust_domain: str) -> dict[str, Any]:
    """Values from the classes of issue #13, each fine or wrong alone, mixed so that some are wrong together."""
    ports = [1, 8080, 8443, 9443, 15001, 15090, 15091, 65535, 0, 65536]
    spec: dict[str, Any] = {"serviceAccountName": "web", "trustDomain": trust_domain,
                            "ttl": _maybe(rng, ["10s", "1m", "1h", "24h", "9s", "0s"]),
                            "renewBefore": _maybe(rng, ["0s", "1s", "3s", "30s", "5m", "54m", "55m", "59m59s",
                                                        "2h", "9001ms"]),
                            "renewAtPercent": _maybe(rng, [9, 10, 66, 95, 96]),
                            "dnsNames": _maybe(rng, [rng.sample(["web", "web.shop.svc", "10.0.0.1", "167772161",
                                                                 "*.0.0.1", "0x7f.1", "*.web", "a1.b2"], 2)]),
                            "inbound": _maybe(rng, [[{"port": rng.choice(ports), "appPort": rng.choice(ports)}
                                                     for _ in range(rng.randint(1, 3))]]),
                            "outbound": _maybe(rng, [[{"listenPort": rng.choice(ports),
                                                       "address": "api.svc:" + rng.choice(
                                                           ["443", "0", "1", "65535", "65536", "99999", "08080"]),
                                                       "peer": f"spiffe://{trust_domain}/ns/a/sa/b"}
                                                      for _ in range(rng.randint(1, 3))]])}
    return {k: v for k, v in spec.items() if v is not None}


def random_trust_domain_spec(rng: random.Random) -> dict[str, Any]:
    ca = {"validity": _maybe(rng, ["1h", "2h", "12h", "24h", "25h", "8760h", "87600h", "87601h"]),
          "rotateBefore": _maybe(rng, ["0s", "1m", "90s", "91s", "1h", "2h", "3h", "8000h"]),
          "propagationDelay": _maybe(rng, ["0s", "1s", "5s", "90s", "5m", "1h", "61m"]),
          "secretRef": _maybe(rng, [{"name": "team-ca"}])}
    certificates = {"maxTTL": _maybe(rng, ["30m", "1h", "24h", "48h"]),
                    "defaultTTL": _maybe(rng, ["10m"]),
                    "backdate": _maybe(rng, ["0s", "60s", "1h", "61m"]),
                    "allowedDNSNames": _maybe(rng, [["*.$(namespace).svc"], ["**"], ["a.**.b"], []])}
    spec = {"ca": {k: v for k, v in ca.items() if v is not None},
            "certificates": {k: v for k, v in certificates.items() if v is not None},
            "crl": {"validity": v} if (v := _maybe(rng, ["0s", "4m59s", "5m", "10m", "24h", "240h", "241h"])) else {},
            "bundle": {"configMapName": v} if (v := _maybe(rng, ["meshtls-bundle", "kube-root-ca.crt", "coredns",
                                                                 "kube-x", "a-meshtls-proxy", "cluster-info"]))
            else {}}
    return {k: v for k, v in spec.items() if v}


@pytest.mark.timeout(180)
def test_the_api_server_and_the_model_refuse_the_same_specs(
    kube: Kube, crds: None, namespace: str, trust_domain: str,
) -> None:
    """Random combinations from every class of issue #13, judged by the real API server (dry run) and by
    meshtls.api.model's parsers: what one refuses the other refuses, so the operator holds the line where an older
    CRD would let a spec through."""
    seed = int(os.environ.get("HOSTILE_SEED", time.time()))
    rng = random.Random(seed)
    disagreements: list[str] = []
    refused = 0
    for i in range(DIFFERENTIAL_SPECS):
        for kind, spec in (("WorkloadIdentity", random_identity_spec(rng, trust_domain)),
                           ("TrustDomain", random_trust_domain_spec(rng))):
            name = f"diff-{i}-{uuid.uuid4().hex[:4]}" + (".example" if kind == "TrustDomain" else "")
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
            try:
                if kind == "TrustDomain":
                    kube.custom.create_cluster_custom_object(GROUP, VERSION, "trustdomains", body, dry_run="All")
                else:
                    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "workloadidentities",
                                                                body, dry_run="All")
                api_error = None
            except ApiException as exc:
                assert exc.status == 422, (exc.status, exc.body)
                api_error = str(exc.body)[:400]
            try:
                if kind == "TrustDomain":
                    parse_trust_domain(body)
                else:
                    parse_workload_identity({**body, "metadata": {"name": name, "namespace": namespace}})
                model_error = None
            except SpecError as exc:
                model_error = str(exc)
            refused += api_error is not None
            if (api_error is None) != (model_error is None):
                disagreements.append(f"{kind} {spec}: API server {api_error or 'accepts'}; model "
                                     f"{model_error or 'accepts'}")
    print(f"\nfigures: {2 * DIFFERENTIAL_SPECS} random specs (seed {seed}), {refused} refused by the API server, "
          f"{len(disagreements)} judged otherwise by the model")
    assert not disagreements, f"seed {seed}:\n" + "\n".join(disagreements[:10])
