"""A WorkloadIdentity at run time on the real control plane (issue #13): the re-issue floor, a schedule that follows
the spec, spec changes that leave nothing valid behind, repairs judged by content (with their time-to-repair),
sidecar configs too large to publish, overlapping identities and namespaces deleted under the operator."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.harness import Cluster
from e2e.kube_helpers import Kube, is_ready, ready_condition, wait_for
from e2e.operator_process import OperatorProcess
from meshtls.pki import load_certificates, load_private_key_pem, svid_spiffe_id
from meshtls.pki.keys import public_keys_match
from meshtls.policy.renewal import renewal_time

REPO = Path(__file__).resolve().parents[1]
IDENTITY_CRD = REPO / "crds" / "workloadidentities.meshtls.dev.yaml"
SECOND_TRUST_DOMAIN = "e2e-b.meshtls.test"
SECOND_BUNDLE = "meshtls-bundle-b"
SPIN_CPU_BOUND = 2.0  # CPU seconds over a 20 s window: a loop that spins burns most of a core


def leaf(data: dict[str, bytes]) -> x509.Certificate:
    return load_certificates(data["tls.crt"])[0]


def serial_of(data: dict[str, bytes] | None) -> str | None:
    return format(leaf(data).serial_number, "x") if data and data.get("tls.crt") else None


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in (body or {}).get("status", {}).get("conditions", []) if c.get("type") == type_), {})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def on_crl(kube: Kube, namespace: str, bundle: str, serial: str) -> bool:
    crl_pem = (kube.configmap_data(namespace, bundle) or {}).get("crl.pem", "")
    for block in crl_pem.split("-----END X509 CRL-----"):
        if "BEGIN X509 CRL" in block:
            crl = x509.load_pem_x509_crl((block + "-----END X509 CRL-----\n").encode())
            if crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None:
                return True
    return False


@contextlib.contextmanager
def older_identity_crd(cluster: Cluster, tmp_path: Path) -> Iterator[None]:
    """The WorkloadIdentity CRD without its CEL rules, as an older chart would have installed it: the operator must
    not rely on the API server for what keeps it safe. The current CRD is put back afterwards."""
    crd = yaml.safe_load(IDENTITY_CRD.read_text())

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    older = copy.deepcopy(crd)
    for version in older["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"]["properties"]["spec"] = strip(
            version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    path = tmp_path / "older-crd.yaml"
    path.write_text(yaml.safe_dump(older))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    try:
        yield
    finally:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(IDENTITY_CRD))


@pytest.fixture
def second_trust_domain(kube: Kube, kube_api: client.ApiClient, trust_domain: str) -> Iterator[str]:
    """Another trust domain, publishing into its own bundle ConfigMap; deleted afterwards (identities of other
    suites name their trust domain, but a lingering second one must not outlive this test)."""
    kube.create_trust_domain(SECOND_TRUST_DOMAIN, {"certificates": {"minTTL": "10s", "defaultTTL": "1h"},
                                                   "bundle": {"configMapName": SECOND_BUNDLE}})
    wait_for("the second TrustDomain to be Ready", lambda: is_ready(kube.trust_domain(SECOND_TRUST_DOMAIN)), 30)
    yield SECOND_TRUST_DOMAIN
    with contextlib.suppress(ApiException):
        client.CustomObjectsApi(kube_api).delete_cluster_custom_object("meshtls.dev", "v1alpha1", "trustdomains",
                                                                        SECOND_TRUST_DOMAIN)


# --- the re-issue floor -------------------------------------------------------------------------------------------


def test_a_renewal_point_at_issuance_is_refused_by_the_operator_and_never_spins(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    """ttl 1h, renewBefore 59m59s rotated ~10 times a second on d50b0bf. An older CRD (no CEL rule) lets it in; the
    operator's own model refuses it naming the field, once, and nothing is issued. (The run-time re-issue floor behind
    that check is tested over every (ttl, renewBefore, renewAtPercent) class in tests/test_identity_runtime.py.)"""
    # The older CRD stays in place over the measured window: putting the current one back makes the API server end
    # every watch on identities, and the operator's relist of all of them is work, not a spin.
    with older_identity_crd(cluster, tmp_path):
        kube.create_identity(namespace, "hot", {"serviceAccountName": "hot", "trustDomain": trust_domain,
                                                "ttl": "1h", "renewBefore": "59m59s"})
        ready = wait_for("Ready=False", lambda: (c := condition(kube.identity(namespace, "hot"), "Ready"))
                         and c.get("status") == "False" and c, 10)
        assert ready.get("reason") == "InvalidSpec" and "spec.renewBefore" in ready.get("message", ""), ready
        assert running_operator.proc is not None
        pid = running_operator.proc.pid
        cpu_before, version = cpu_seconds(pid), kube.identity(namespace, "hot")["metadata"]["resourceVersion"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert not kube.secret_data(namespace, "hot-mtls"), "a certificate was issued for a refused renewal point"
            time.sleep(0.5)
        cpu = cpu_seconds(pid) - cpu_before
    assert kube.identity(namespace, "hot")["metadata"]["resourceVersion"] == version, "status rewritten while idle"
    warnings = kube.events(namespace, reason="InvalidSpec", name="hot")
    assert len(warnings) == 1 and warnings[0].type == "Warning" and (warnings[0].count or 1) == 1, warnings
    # What proves "never spins" is above and exact: no certificate, no status write, one Warning. The CPU bound only
    # catches a loop that writes nothing (one burns most of a core, ~20 s here); it is 10 % of a core because the
    # operator is shared with the suite and may still be finishing the previous test's namespace (0.74 s seen in CI).
    assert cpu < SPIN_CPU_BOUND, f"operator CPU {cpu:.2f} s over 20 s with one refused identity"
    print(f"ttl 1h renewBefore 59m59s under an older CRD: refused ({ready.get('message')}), 0 certificates, "
          f"1 Warning, operator CPU {cpu:.2f} s over 20 s")


def test_a_changed_renewal_point_moves_the_schedule_at_once(
    kube: Kube, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    kube.create_identity(namespace, "sched", {"serviceAccountName": "sched", "trustDomain": trust_domain,
                                              "ttl": "1h"})
    data = wait_for("the Secret", lambda: kube.secret_data(namespace, "sched-mtls"), 10)
    wait_for("Ready", lambda: is_ready(kube.identity(namespace, "sched")), 10)
    secret = client.CoreV1Api(kube.api).read_namespaced_secret("sched-mtls", namespace)
    annotations = secret.metadata.annotations
    issued_at = dt.datetime.fromisoformat(annotations["meshtls.dev/issued-at"])
    cert = leaf(data)
    for change, fraction, before in [({"renewAtPercent": 90}, 0.9, None), ({"renewAtPercent": 30}, 0.3, None),
                                     ({"renewAtPercent": None, "renewBefore": "50m"}, 2 / 3,
                                      dt.timedelta(minutes=50))]:
        kube.patch_identity(namespace, "sched", {"spec": change})
        want = renewal_time(issued_at, cert.not_valid_after_utc, fraction, before, seed=serial_of(data) or "",
                            on_schedule=annotations.get("meshtls.dev/on-schedule") == "true")  # a first: off
        started = time.monotonic()
        wait_for(f"status.renewalTime to follow {change}",
                 lambda want=want: (kube.identity(namespace, "sched") or {}).get("status", {}).get("renewalTime")
                 == want.strftime("%Y-%m-%dT%H:%M:%SZ"), 10)
        print(f"{change}: renewal moved to {want:%H:%M:%S} in {time.monotonic() - started:.2f} s")
    assert serial_of(kube.secret_data(namespace, "sched-mtls")) == serial_of(data)  # same certificate, new schedule


# --- a spec change leaves nothing valid behind ----------------------------------------------------------------------


CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("serviceAccountName", {"serviceAccountName": "moved"}),
    ("secretName", {"secretName": "renamed-tls"}),
    ("trustDomain", {"trustDomain": SECOND_TRUST_DOMAIN}),
    ("all three", {"serviceAccountName": "moved", "secretName": "renamed-tls", "trustDomain": SECOND_TRUST_DOMAIN}),
]


@pytest.mark.parametrize(("what", "change"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_spec_change_revokes_the_old_certificate_on_its_issuers_crl(
    kube: Kube, namespace: str, trust_domain: str, second_trust_domain: str, running_operator: OperatorProcess,
    what: str, change: dict[str, Any],
) -> None:
    kube.create_identity(namespace, "mover", {"serviceAccountName": "mover", "trustDomain": trust_domain})
    first = wait_for("the Secret", lambda: kube.secret_data(namespace, "mover-mtls"), 10)
    kube.patch_identity(namespace, "mover", {"metadata": {"annotations": {"meshtls.dev/renew": "r1"}}})
    second = wait_for("a renewal", lambda: (d := kube.secret_data(namespace, "mover-mtls"))
                      and serial_of(d) != serial_of(first) and d, 10)
    old_serials = [serial_of(first), serial_of(second)]
    kube.patch_identity(namespace, "mover", {"spec": change})
    started = time.monotonic()
    new_name = change.get("secretName", "mover-mtls")
    new_td = change.get("trustDomain", trust_domain)
    new_id = f"spiffe://{new_td}/ns/{namespace}/sa/{change.get('serviceAccountName', 'mover')}"
    fresh = wait_for("a certificate for the new spec", lambda: (d := kube.secret_data(namespace, new_name))
                     and str(svid_spiffe_id(leaf(d))) == new_id and serial_of(d) not in old_serials and d, 10)
    old_bundle = "meshtls-bundle"  # the fixture trust domain's: where the old certificates were issued
    for serial in old_serials:
        wait_for(f"old serial {serial} on the CRL of {trust_domain}",
                 lambda serial=serial: on_crl(kube, namespace, old_bundle, serial), 10)
    if new_name != "mover-mtls":
        wait_for("the old Secret to be removed", lambda: kube.secret_data(namespace, "mover-mtls") is None, 10)
    elapsed = time.monotonic() - started
    new_bundle = SECOND_BUNDLE if new_td == second_trust_domain else old_bundle
    assert not on_crl(kube, namespace, new_bundle, serial_of(fresh) or "")
    if new_td != trust_domain:  # the old serials went on the issuer's CRL, not the new trust domain's
        assert not any(on_crl(kube, namespace, SECOND_BUNDLE, s or "") for s in old_serials)
    status = wait_for("the status to record the new certificate", lambda: (s := (kube.identity(
        namespace, "mover") or {}).get("status", {})).get("serialNumber") == serial_of(fresh) and s, 10)
    assert {e.get("trustDomain") for e in status["activeSerials"]} == {new_td}  # the revoked ones left the list
    assert wait_for("a Superseded Event", lambda: kube.events(namespace, reason="Superseded", name="mover"), 5)
    assert not kube.events(namespace, reason="Repaired", name="mover"), "a spec change is not a repair"
    # deletion then revokes what is left on the CRL of the trust domain that issued it
    kube.delete_identity(namespace, "mover")
    wait_for("the new serial on its issuer's CRL", lambda: on_crl(kube, namespace, new_bundle, serial_of(fresh) or ""),
             10)
    wait_for("the identity to be gone", lambda: kube.identity(namespace, "mover") is None, 10)
    print(f"{what} changed: {len(old_serials)} old serials revoked on {trust_domain}'s CRL"
          f"{', old Secret removed' if new_name != 'mover-mtls' else ''} in {elapsed:.2f} s")


def test_a_move_away_from_a_deleted_trust_domain_does_not_stall(
    kube: Kube, kube_api: client.ApiClient, namespace: str, trust_domain: str, second_trust_domain: str,
    running_operator: OperatorProcess,
) -> None:
    """The certificate to supersede was issued by a trust domain that no longer exists: nothing to publish, nothing
    to crash on; the new certificate comes at once and deletion is not held."""
    kube.create_identity(namespace, "orphan", {"serviceAccountName": "orphan", "trustDomain": second_trust_domain})
    first = wait_for("the Secret", lambda: kube.secret_data(namespace, "orphan-mtls"), 10)
    client.CustomObjectsApi(kube_api).delete_cluster_custom_object("meshtls.dev", "v1alpha1", "trustdomains",
                                                                    second_trust_domain)
    wait_for("the TrustDomain to be gone", lambda: not [
        t for t in client.CustomObjectsApi(kube_api).list_cluster_custom_object(
            "meshtls.dev", "v1alpha1", "trustdomains")["items"] if t["metadata"]["name"] == second_trust_domain], 15)
    kube.patch_identity(namespace, "orphan", {"spec": {"trustDomain": trust_domain}})
    fresh = wait_for("a certificate of the remaining trust domain", lambda: (d := kube.secret_data(
        namespace, "orphan-mtls")) and serial_of(d) != serial_of(first) and str(svid_spiffe_id(leaf(d))).startswith(
        f"spiffe://{trust_domain}/") and d, 15)
    wait_for("Ready", lambda: is_ready(kube.identity(namespace, "orphan")), 10)
    started = time.monotonic()
    kube.delete_identity(namespace, "orphan")
    wait_for("its serial on the CRL", lambda: on_crl(kube, namespace, "meshtls-bundle", serial_of(fresh) or ""), 10)
    wait_for("the identity to be gone", lambda: kube.identity(namespace, "orphan") is None, 10)
    print(f"moved off a deleted trust domain; deletion finished in {time.monotonic() - started:.2f} s")


# --- everything meshtls writes heals; time-to-repair -----------------------------------------------------------------


def test_secrets_and_sidecar_configs_heal_judged_by_content(
    kube: Kube, kube_api: client.ApiClient, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    core = client.CoreV1Api(kube_api)
    spec = {"trustDomain": trust_domain, "inbound": [{"port": 8443, "appPort": 8080}]}
    kube.create_identity(namespace, "web", {"serviceAccountName": "web", **spec})
    kube.create_identity(namespace, "other", {"serviceAccountName": "other", "trustDomain": trust_domain})
    wait_for("both Secrets", lambda: kube.secret_data(namespace, "web-mtls") and kube.secret_data(namespace,
                                                                                                   "other-mtls"), 10)
    config = wait_for("the sidecar ConfigMap", lambda: kube.configmap_data(namespace, "web-meshtls-proxy"), 10)
    web_id = f"spiffe://{trust_domain}/ns/{namespace}/sa/web"
    figures: dict[str, float] = {}

    def genuine(previous: set[str | None]) -> Callable[[], bool]:
        def check() -> bool:
            data = kube.secret_data(namespace, "web-mtls")
            if not data or serial_of(data) in previous or str(svid_spiffe_id(leaf(data))) != web_id:
                return False
            status = (kube.identity(namespace, "web") or {}).get("status", {})
            return (public_keys_match(leaf(data).public_key(), load_private_key_pem(data["tls.key"]).public_key())
                    and status.get("serialNumber") == serial_of(data) and "BEGIN" in data["ca.crt"].decode())
        return check

    def tamper(kind: str, act: Callable[[], None], repaired: Callable[[], bool]) -> None:
        act()
        started = time.monotonic()
        wait_for(f"repair after: {kind}", repaired, 15, interval=0.05)
        figures[kind] = time.monotonic() - started

    def swap_in(data: dict[str, bytes], annotations_from: str) -> None:
        """Content replaced and meshtls's annotations copied from the Secret the content came from."""
        source = core.read_namespaced_secret(annotations_from, namespace).metadata.annotations or {}
        copied = {k: v for k, v in source.items() if k.startswith("meshtls.dev/") and k != "meshtls.dev/owner-uid"}
        import base64

        core.patch_namespaced_secret("web-mtls", namespace, {
            "metadata": {"annotations": copied},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})

    seen = {serial_of(kube.secret_data(namespace, "web-mtls"))}
    tamper("Secret deleted", lambda: core.delete_namespaced_secret("web-mtls", namespace), genuine(seen))
    seen.add(serial_of(kube.secret_data(namespace, "web-mtls")))
    other = kube.secret_data(namespace, "other-mtls") or {}
    tamper("tls.crt+key swapped for another valid certificate of the CA, annotations copied",
           lambda: swap_in(other, "other-mtls"), genuine(seen))
    seen.add(serial_of(kube.secret_data(namespace, "web-mtls")))
    tamper("tls.key swapped", lambda: swap_in({"tls.key": other["tls.key"]}, "web-mtls"), genuine(seen))
    seen.add(serial_of(kube.secret_data(namespace, "web-mtls")))
    # a rollback: the identity's own previous certificate, still valid, with its annotations as they were then
    previous = kube.secret_data(namespace, "web-mtls") or {}
    previous_annotations = core.read_namespaced_secret("web-mtls", namespace).metadata.annotations
    kube.patch_identity(namespace, "web", {"metadata": {"annotations": {"meshtls.dev/renew": "r1"}}})
    wait_for("a renewal", lambda: serial_of(kube.secret_data(namespace, "web-mtls")) not in seen, 10)
    seen.add(serial_of(kube.secret_data(namespace, "web-mtls")))

    def roll_back() -> None:
        import base64

        core.patch_namespaced_secret("web-mtls", namespace, {
            "metadata": {"annotations": previous_annotations},
            "data": {k: base64.b64encode(v).decode() for k, v in previous.items()}})

    tamper("rolled back to its previous certificate", roll_back, genuine(seen))
    seen.add(serial_of(kube.secret_data(namespace, "web-mtls")))
    other_td_ca = (kube.configmap_data(namespace, "meshtls-bundle") or {}).get("ca.crt", "")
    foreign = load_certificates(other.get("ca.crt", b""))[0]  # any valid CA certificate works as "foreign" bytes
    assert foreign is not None and other_td_ca
    tamper("ca.crt edited", lambda: core.patch_namespaced_secret("web-mtls", namespace, {
        "stringData": {"ca.crt": "-----BEGIN CERTIFICATE-----\nnot a CA\n-----END CERTIFICATE-----\n"}}),
        genuine(seen))

    def config_restored() -> bool:
        return kube.configmap_data(namespace, "web-meshtls-proxy") == config

    tamper("sidecar ConfigMap edited", lambda: core.patch_namespaced_config_map(
        "web-meshtls-proxy", namespace, {"data": {"proxy.yaml": "spiffeId: spiffe://evil/x\n"}}), config_restored)
    tamper("sidecar ConfigMap deleted", lambda: core.delete_namespaced_config_map("web-meshtls-proxy", namespace),
           config_restored)
    repaired = kube.events(namespace, reason="Repaired", name="web")
    assert len(repaired) >= 1
    width = max(len(k) for k in figures)
    print("time-to-repair:\n" + "\n".join(f"  {kind:<{width}}  {seconds:6.2f} s" for kind, seconds in figures.items()))


# --- a sidecar config that cannot be published ------------------------------------------------------------------------


def test_a_sidecar_config_over_the_object_limit_is_a_condition_not_a_retry_loop(
    kube: Kube, cluster: Cluster, namespace: str, trust_domain: str, running_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    prefix = f"spiffe://{trust_domain}/ns/{namespace}/sa/peer-"
    peers = [f"{prefix}{i:03d}-" + "x" * (2048 - len(prefix) - 4) for i in range(256)]
    outbound = [{"listenPort": 15000 + i, "address": f"svc{i}.{namespace}.svc:443", "peer": peers[i]}
                for i in range(32)]
    inbound = [{"port": 8443, "appPort": 8080}, {"port": 9443, "appPort": 9080}]
    kube.create_identity(namespace, "huge", {"serviceAccountName": "huge", "trustDomain": trust_domain,
                                             "allowedPeers": peers, "inbound": inbound, "outbound": outbound})
    cond = wait_for("a SidecarConfigTooLarge condition",
                    lambda: (c := ready_condition(kube.identity(namespace, "huge"))).get("reason")
                    == "SidecarConfigTooLarge" and c, 15)
    assert cond["status"] == "False" and "spec.allowedPeers" in cond["message"] and "1048576" in cond["message"]
    version = (kube.identity(namespace, "huge") or {})["metadata"]["resourceVersion"]
    time.sleep(10)
    after = kube.identity(namespace, "huge") or {}
    warnings = kube.events(namespace, reason="SidecarConfigTooLarge", name="huge")
    assert len(warnings) == 1 and (warnings[0].count or 1) == 1, "reported more than once"
    assert after["metadata"]["resourceVersion"] == version, "status rewritten while nothing changed"
    assert kube.configmap_data(namespace, "huge-meshtls-proxy") is None
    # a spec that fits is published at once
    kube.patch_identity(namespace, "huge", {"spec": {"allowedPeers": peers[:8], "outbound": outbound[:2]}})
    wait_for("the sidecar ConfigMap after the spec shrank",
             lambda: kube.configmap_data(namespace, "huge-meshtls-proxy"), 10)
    wait_for("Ready", lambda: is_ready(kube.identity(namespace, "huge")), 10)
    print(f"too-large sidecar config: condition {cond['reason']}, 1 Warning, no write in 10 s")


# --- identities that would put certificates on the same pods -----------------------------------------------------


def test_identities_selecting_the_same_pods_name_each_other(
    kube: Kube, namespace: str, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    def overlapping(name: str) -> dict[str, Any]:
        return condition(kube.identity(namespace, name), "Overlapping")

    kube.create_identity(namespace, "all", {"serviceAccountName": "shared", "trustDomain": trust_domain})
    kube.create_identity(namespace, "front", {"serviceAccountName": "shared", "trustDomain": trust_domain,
                                              "secretName": "front-tls", "podSelector": {"matchLabels": {"app": "f"}},
                                              "inbound": [{"port": 8443, "appPort": 8080}]})
    kube.create_identity(namespace, "back", {"serviceAccountName": "shared", "trustDomain": trust_domain,
                                             "secretName": "back-tls", "podSelector": {"matchLabels": {"app": "b"}}})
    kube.create_identity(namespace, "alone", {"serviceAccountName": "elsewhere", "trustDomain": trust_domain})
    wait_for("'all' to name both others", lambda: overlapping("all").get("status") == "True"
             and "back" in overlapping("all")["message"] and "front" in overlapping("all")["message"], 15)
    for name in ("front", "back"):
        wait_for(f"{name} to name 'all'", lambda name=name: overlapping(name).get("status") == "True"
                 and "all" in overlapping(name)["message"], 15)
    assert "back" not in overlapping("front")["message"] and "front" not in overlapping("back")["message"]
    assert overlapping("alone") == {}
    for name in ("all", "front", "back", "alone"):
        wait_for(f"{name} Ready (an overlap is a warning)", lambda name=name: is_ready(kube.identity(namespace, name)),
                 10)
    assert kube.events(namespace, reason="Overlapping", name="all")[0].type == "Warning"
    # a restart sees the identities one by one: the first must not report "no overlap" before it sees the others
    versions = {n: (kube.identity(namespace, n) or {})["metadata"]["resourceVersion"] for n in ("all", "front", "back")}
    warnings = len(kube.events(namespace, reason="Overlapping"))
    running_operator.stop()
    running_operator.start()
    time.sleep(5)
    assert {n: (kube.identity(namespace, n) or {})["metadata"]["resourceVersion"] for n in versions} == versions
    assert len(kube.events(namespace, reason="Overlapping")) == warnings
    kube.delete_identity(namespace, "all")
    for name in ("front", "back"):
        wait_for(f"{name} no longer overlapping", lambda name=name: overlapping(name).get("status") == "False", 15)


# --- a namespace deleted with its identities ------------------------------------------------------------------------


def test_deleting_a_namespace_with_identities_is_quiet_and_finishes(
    kube: Kube, kube_api: client.ApiClient, trust_domain: str, running_operator: OperatorProcess,
) -> None:
    core = client.CoreV1Api(kube_api)
    name = f"e2e-doomed-{os.getpid()}-{int(time.time()) % 100000}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"e2e": "true"})))
    for i in range(4):
        spec: dict[str, Any] = {"serviceAccountName": f"sa{i}", "trustDomain": trust_domain}
        if i % 2:
            spec["inbound"] = [{"port": 8443, "appPort": 8080}]
        kube.create_identity(name, f"id{i}", spec)
    for i in range(4):
        wait_for(f"id{i} Ready", lambda i=i: is_ready(kube.identity(name, f"id{i}")), 15)
    log_offset = running_operator.log_path.stat().st_size
    started = time.monotonic()
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for("the namespace to be gone", gone, 60, interval=0.5)
    elapsed = time.monotonic() - started
    time.sleep(12)  # past the old 10 s retry: nothing may come back for it
    with running_operator.log_path.open("rb") as f:
        f.seek(log_offset)
        log = f.read().decode(errors="replace")
    about = [line for line in log.splitlines() if name in line]
    # the identities' own work (reconcile, scheduler, deletion): quiet; publishing bundles is the trust domain's
    mine = [line for line in about if "meshtls.identity" in line or "meshtls.scheduler" in line]
    assert "Traceback" not in log, log[-4000:]
    assert not [line for line in mine if "WARNING" in line or "ERROR" in line], "\n".join(mine)
    print(f"namespace with 4 identities deleted in {elapsed:.1f} s; {len(about)} log lines about it, no warning "
          "from the identities' reconcile, no traceback")
