"""The cluster commands' rendering and verdicts from sample bodies: tables, JSON/YAML, check lines. No cluster."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshtls.api.constants import ANNOTATION_OWNER_UID, LABEL_MANAGED_BY, MANAGED_BY
from meshtls.api.objects import SecretSnapshot
from meshtls.cli import checks
from meshtls.cli.inspection import inspect_report
from meshtls.cli.main import build_parser, main
from meshtls.cli.output import Output
from meshtls.cli.views.check import CheckResult, check_line, check_summary
from meshtls.cli.views.events import event_row, sorted_events, watch_line
from meshtls.cli.views.identities import identities_table, identity_detail, identity_detail_data, identity_row
from meshtls.cli.views.inspect import inspect_renderable
from meshtls.cli.views.times import human_duration
from meshtls.pki import (
    CertificateAuthority,
    IssuedCertificate,
    RevocationReason,
    RevokedCertificate,
    build_crl,
    crl_pem,
    generate_ca,
    issue_svid,
    parse_spiffe_id,
)

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
T0 = NOW - dt.timedelta(days=1)
UID = "0b5c6a5e-1111-2222-3333-444455556666"


def ts(delta: dt.timedelta = dt.timedelta(0)) -> str:
    return (NOW + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity(name: str = "web", namespace: str = "shop", ready: bool = True, serial: str = "ab12",
             **status: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "meshtls.dev/v1alpha1", "kind": "WorkloadIdentity",
        "metadata": {"name": name, "namespace": namespace, "uid": UID},
        "spec": {"serviceAccountName": name, "trustDomain": "example.org"},
        "status": {
            "spiffeID": f"spiffe://example.org/ns/{namespace}/sa/{name}", "trustDomain": "example.org",
            "secretName": f"{name}-mtls", "serialNumber": serial, "notBefore": ts(-dt.timedelta(minutes=21)),
            "notAfter": ts(dt.timedelta(minutes=40)), "renewalTime": ts(dt.timedelta(minutes=20)), "rotations": 3,
            "lastRotationTime": ts(-dt.timedelta(minutes=20)),
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False",
                 "reason": "Issued" if ready else "SecretConflict",
                 "message": "certificate valid" if ready else "Secret web-mtls exists and is not owned by [meshtls]",
                 "lastTransitionTime": ts(-dt.timedelta(hours=2))},
                {"type": "Issuing", "status": "False", "reason": "Issued", "message": "up to date",
                 "lastTransitionTime": ts(-dt.timedelta(hours=2))},
            ],
            **status,
        },
    }
    return body


def event(reason: str, message: str, at: dt.timedelta, name: str = "web", type_: str = "Normal",
          field: str = "lastTimestamp") -> dict[str, Any]:
    return {"metadata": {"name": f"{name}.{reason}", "namespace": "shop"}, "reason": reason, "message": message,
            "type": type_, field: ts(at), "involvedObject": {"kind": "WorkloadIdentity", "name": name,
                                                               "namespace": "shop"}}


def plain(renderable: Any) -> str:
    buf = io.StringIO()
    Output("table", file=buf).show(renderable)
    return buf.getvalue()


# --- durations and rows --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (45, "45s"), (200, "3m20s"), (900, "15m"), (3900, "1h5m"), (3600, "1h"), (2 * 86400 + 4 * 3600, "2d4h"),
    (364 * 86400 + 5, "364d"), (-90, "-1m30s"),
])
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(dt.timedelta(seconds=seconds)) == text


def test_identity_row_carries_what_the_table_shows_and_raw_seconds() -> None:
    row = identity_row(identity(), NOW)
    assert row["spiffeID"] == "spiffe://example.org/ns/shop/sa/web"
    assert row["ready"] == "True" and row["serial"] == "ab12" and row["rotations"] == 3
    assert row["expiresInSeconds"] == 2400 and row["renewsInSeconds"] == 1200
    assert row["secretName"] == "web-mtls" and row["dataPlane"] is None


def test_the_data_plane_is_shown_as_the_operator_recorded_it() -> None:
    body = identity()
    body["status"]["dataPlane"] = "envoy"
    assert identity_row(body, NOW)["dataPlane"] == "envoy"
    assert "Data plane" in plain(identity_detail(body, [], NOW)) and "envoy" in plain(identity_detail(body, [], NOW))
    assert "- (no sidecar routes)" in plain(identity_detail(identity(), [], NOW))


def test_identity_without_status_yet() -> None:
    body = {"metadata": {"name": "new", "namespace": "shop"}, "spec": {"serviceAccountName": "new"}}
    row = identity_row(body, NOW)
    assert row["ready"] == "Unknown" and row["serial"] is None and row["expiresInSeconds"] is None
    out = plain(identities_table([row], NOW))
    assert "Unknown" in out and "new-mtls" not in out


def test_status_table_plain_has_the_columns_and_no_escape_codes_or_trailing_blanks() -> None:
    rows = [identity_row(identity("web"), NOW), identity_row(identity("api", ready=False, serial="cd34"), NOW)]
    out = plain(identities_table(rows, NOW))
    lines = out.splitlines()
    header = lines[0]
    for column in ("NAMESPACE", "NAME", "SPIFFE ID", "READY", "SERIAL", "EXPIRES IN", "RENEWS IN", "ROTATIONS",
                   "LAST ROTATION"):
        assert column in header
    assert "\x1b[" not in out and all(line == line.rstrip() for line in lines)
    assert "─" not in out  # no box lines when not a terminal
    web = next(line for line in lines if " web " in line)
    assert "spiffe://example.org/ns/shop/sa/web" in web and "True" in web and "40m" in web and "20m" in web
    assert "20m ago" in web
    api = next(line for line in lines if " api " in line)
    assert "False (SecretConflict)" in api


def test_expired_and_overdue_cells() -> None:
    body = identity(notAfter=ts(-dt.timedelta(minutes=3)), renewalTime=ts(-dt.timedelta(minutes=10)))
    out = plain(identities_table([identity_row(body, NOW)], NOW))
    assert "expired 3m ago" in out and "overdue 10m" in out


def test_status_as_json_and_yaml_round_trip() -> None:
    rows = [identity_row(identity(), NOW)]
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        buf = io.StringIO()
        Output(fmt, file=buf).dump({"items": rows})
        assert load(buf.getvalue())["items"][0]["serial"] == "ab12"


def test_terminal_output_uses_rich_and_no_color_turns_it_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [identity_row(identity(), NOW)]
    monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    out = Output("table", file=buf, force_terminal=True)
    out.console.width = 200
    out.show(identities_table(rows, NOW))
    assert "\x1b[" in buf.getvalue() and "─" in buf.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    buf = io.StringIO()
    Output("table", file=buf, force_terminal=True).show(identities_table(rows, NOW))
    assert "\x1b[" not in buf.getvalue() and "─" not in buf.getvalue()


def test_messages_are_never_read_as_markup() -> None:
    out = plain(identities_table([identity_row(identity(ready=False), NOW)], NOW))
    detail = plain(identity_detail(identity(ready=False), [event("SecretConflict", "not [bold]ours[/bold]",
                                                                 -dt.timedelta(seconds=5), type_="Warning")], NOW))
    assert "not [bold]ours[/bold]" in detail and "[meshtls]" in detail
    assert "False (SecretConflict)" in out


# --- one identity: conditions and Events ---------------------------------------------------------------------------


def test_detail_shows_conditions_and_events_oldest_first_limited() -> None:
    events = [event("Rotated", f"serial {i}", -dt.timedelta(minutes=30 - i)) for i in range(25)]
    events.append(event("Issued", "first issue", -dt.timedelta(hours=3), field="eventTime"))
    out = plain(identity_detail(identity(), list(reversed(events)), NOW, limit=5))
    assert "Ready" in out and "Issuing" in out and "certificate valid" in out
    assert "Events (last 5)" in out
    shown = [line for line in out.splitlines() if "Rotated" in line]
    assert [line.split("serial ")[1].strip() for line in shown] == ["20", "21", "22", "23", "24"]
    data = identity_detail_data(identity(), events, NOW, limit=30)
    assert data["events"][0]["reason"] == "Issued"  # eventTime counts when lastTimestamp is absent
    assert [c["type"] for c in data["conditions"]] == ["Ready", "Issuing"]
    assert identity_detail_data(identity(), events, NOW, limit=0)["events"] == []
    assert "Events: none" in plain(identity_detail(identity(), events, NOW, limit=0))


def test_event_time_falls_back_to_creation_timestamp() -> None:
    e = {"metadata": {"creationTimestamp": ts(-dt.timedelta(seconds=1))}, "reason": "Issued", "message": "m",
         "involvedObject": {"name": "x", "namespace": "ns"}}
    older = event("Rotated", "r", -dt.timedelta(minutes=1))
    assert sorted_events([e, older])[0] is older
    assert event_row(e)["time"] == ts(-dt.timedelta(seconds=1))


def test_watch_line_and_json_lines() -> None:
    row = event_row(event("Rotated", "serial a -> b,\n expires soon", dt.timedelta(0)))
    text = watch_line(row).plain
    assert text == f"{ts()}  shop/web  Rotated  serial a -> b, expires soon"
    buf = io.StringIO()
    out = Output("json", file=buf)
    out.line(row, watch_line(row))
    out.line(row, watch_line(row))
    assert [json.loads(line)["reason"] for line in buf.getvalue().splitlines()] == ["Rotated", "Rotated"]


# --- check lines -----------------------------------------------------------------------------------------------------


def test_check_lines_and_summary() -> None:
    results = [CheckResult("CRDs", "ok", "fine"), CheckResult("operator", "fail", "down"),
               CheckResult("webhook", "skip", "not installed")]
    assert [check_line(r).plain for r in results] == ["✓ CRDs: fine", "✗ operator: down",
                                                        "○ webhook: not installed"]
    assert check_summary(results).plain == "1 passed, 1 failed, 1 skipped"


def crd(name: str, established: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"versions": [{"name": "v1alpha1", "served": True}]},
            "status": {"conditions": [{"type": "Established", "status": "True" if established else "False"}]}}


def test_check_crds() -> None:
    good = {n: crd(n) for n in checks.CRD_NAMES}
    assert checks.check_crds(good).status == "ok"
    missing = {**good, "workloadidentities.meshtls.dev": None}
    r = checks.check_crds(missing)
    assert r.failed and "workloadidentities.meshtls.dev not installed" in r.message
    assert checks.check_crds({n: crd(n, established=False) for n in checks.CRD_NAMES}).failed


def test_check_clock() -> None:
    ok, skew = checks.check_clock(NOW, NOW, NOW + dt.timedelta(milliseconds=20))
    assert ok.status == "ok" and skew == dt.timedelta(0)  # within what one request can measure: not applied
    slow, skew = checks.check_clock(NOW, NOW - dt.timedelta(seconds=1), NOW + dt.timedelta(seconds=2))
    assert slow.status == "ok" and skew == dt.timedelta(0)  # a slow round trip: the estimate is mostly its error
    late, skew = checks.check_clock(NOW + dt.timedelta(seconds=10), NOW, NOW + dt.timedelta(milliseconds=20))
    assert late.status == "ok" and dt.timedelta(seconds=10) < skew < dt.timedelta(seconds=11)  # measurable: applied
    behind, _ = checks.check_clock(NOW + dt.timedelta(seconds=45), NOW, NOW + dt.timedelta(milliseconds=20))
    assert behind.failed and "behind" in behind.message and "NTP" in behind.message
    ahead, _ = checks.check_clock(NOW - dt.timedelta(seconds=40), NOW, NOW)
    assert ahead.failed and "ahead of" in ahead.message
    edge, _ = checks.check_clock(NOW + dt.timedelta(seconds=30), NOW, NOW)  # within resolution + tolerance
    assert edge.status == "ok"
    assert checks.check_clock(None, NOW, NOW)[0].status == "skip"


def lease(holder: str | None, renewed: dt.timedelta) -> dict[str, Any]:
    return {"metadata": {"name": "meshtls-operator", "namespace": "meshtls-system"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 30,
                     "renewTime": (NOW + renewed).isoformat()}}


def test_check_operator_heartbeat_lease() -> None:
    assert checks.check_lease(lease("pod-a", -dt.timedelta(seconds=4)), NOW).status == "ok"
    stale = checks.check_lease(lease("pod-a", -dt.timedelta(seconds=95)), NOW)
    assert stale.failed and "no heartbeat for 1m35s" in stale.message
    released = checks.check_lease(lease(None, -dt.timedelta(seconds=3)), NOW)
    assert released.failed and "released" in released.message


def test_check_operator_kopf_peering_and_probe() -> None:
    peering = {"kind": "ClusterKopfPeering", "metadata": {"name": "meshtls"}, "status": {
        "a@host": {"priority": 0, "lifetime": 60, "lastseen": (NOW - dt.timedelta(seconds=10)).isoformat()},
        "b@host": {"priority": 0, "lifetime": 60, "lastseen": (NOW - dt.timedelta(minutes=10)).isoformat()}}}
    namespaced = {"kind": "KopfPeering", "metadata": {"name": "meshtls", "namespace": "shop"}, "status": {}}
    alive = checks.check_kopf_peering([peering, namespaced], NOW)
    assert alive.status == "ok" and "1 replica(s) alive" in alive.message and "a@host" in alive.message
    peering["status"].pop("a@host")
    dead = checks.check_kopf_peering([peering, namespaced], NOW)
    assert dead.failed and "ClusterKopfPeering meshtls, KopfPeering shop/meshtls" in dead.message
    assert checks.check_health_probe("http://x/healthz", 200, "ok").status == "ok"
    down = checks.check_health_probe("http://x/healthz", None, "connection refused")
    assert down.failed and "connection refused" in down.message


# --- PKI material for the certificate checks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def td_ca() -> CertificateAuthority:
    return generate_ca("example.org", T0, validity=dt.timedelta(days=365))


@pytest.fixture(scope="module")
def svid(td_ca: CertificateAuthority) -> IssuedCertificate:
    return issue_svid(td_ca, parse_spiffe_id("spiffe://example.org/ns/shop/sa/web"), NOW - dt.timedelta(minutes=20),
                      dt.timedelta(hours=1))


def secret_of(cert: IssuedCertificate, key: bytes | None = None) -> SecretSnapshot:
    return SecretSnapshot(exists=True, name="web-mtls",
                          data={"tls.crt": cert.cert_chain_pem, "tls.key": key or cert.key_pem, "ca.crt": cert.ca_pem},
                          labels={LABEL_MANAGED_BY: MANAGED_BY}, annotations={ANNOTATION_OWNER_UID: UID}, uid="s1")


def bundle_of(ca: CertificateAuthority, revoked: list[int] | None = None, at: dt.datetime = NOW,
              crl_validity: dt.timedelta = dt.timedelta(hours=24)) -> dict[str, Any]:
    entries = [RevokedCertificate(s, at, at + dt.timedelta(hours=1), RevocationReason.KEY_COMPROMISE)
               for s in revoked or []]
    crl = build_crl(ca, entries, 2, at, crl_validity)
    return {"data": {"ca.crt": ca.roots_pem.decode(), "crl.pem": crl_pem(crl).decode()}}


def test_check_identity(td_ca: CertificateAuthority, svid: IssuedCertificate,
                        other_svid: IssuedCertificate) -> None:
    body = identity(serial=svid.serial_hex)
    bundle = bundle_of(td_ca)
    assert checks.check_identity(body, secret_of(svid), NOW, "shop/meshtls-bundle", bundle) is None
    not_ready = checks.check_identity(identity(ready=False, serial=svid.serial_hex), secret_of(svid), NOW,
                                      "shop/meshtls-bundle", bundle)
    assert not_ready is not None and "not Ready (SecretConflict" in not_ready.message
    assert "does not exist" in str(checks.check_identity(body, SecretSnapshot(exists=False), NOW))
    mismatch = checks.check_identity(identity(serial="ffff"), secret_of(svid), NOW)
    assert mismatch is not None and f"holds serial {svid.serial_hex}, status.serialNumber is ffff" in mismatch.message
    tampered = checks.check_identity(body, secret_of(svid, key=other_svid.key_pem), NOW)
    assert tampered is not None and "tls.key does not match tls.crt" in tampered.message
    garbage = checks.check_identity(body, secret_of(svid, key=b"garbage"), NOW)
    assert garbage is not None and garbage.message.startswith("Secret web-mtls is unusable: tls.key")
    expired = checks.check_identity(body, secret_of(svid), NOW + dt.timedelta(hours=2))
    assert expired is not None and "expired" in expired.message
    revoked = checks.check_identity(body, secret_of(svid), NOW, "shop/meshtls-bundle",
                                    bundle_of(td_ca, [svid.serial_number]))
    assert revoked is not None and "bundle shop/meshtls-bundle does not verify" in revoked.message
    assert "is revoked" in revoked.message
    foreign = SecretSnapshot(exists=True, name="web-mtls", data=secret_of(svid).data)
    assert "not owned" in str(checks.check_identity(body, foreign, NOW))


@pytest.fixture(scope="module")
def other_svid(td_ca: CertificateAuthority) -> IssuedCertificate:
    return issue_svid(td_ca, parse_spiffe_id("spiffe://example.org/ns/shop/sa/api"), NOW, dt.timedelta(hours=1))


def trust_domain(spec: dict[str, Any] | None = None, ready: bool = True, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "example.org"}, "spec": spec or {},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "CAReady"
                                       if ready else "CAInvalid", "message": "m"}], "crlNumber": 2, "crlEntries": 0,
                       **status}}


def test_check_trust_domain_rotation_window(td_ca: CertificateAuthority) -> None:
    healthy = checks.check_trust_domain(trust_domain(caFingerprint=td_ca.fingerprint), td_ca.certificate, NOW, "s")
    assert healthy.status == "ok" and "rotation window 109d" in healthy.message
    # 30% of 365 d = 109.5 d: the default window opens 255.5 d after issuance
    late = checks.check_trust_domain(trust_domain(), td_ca.certificate, T0 + dt.timedelta(days=260), "s")
    assert late.failed and "inside its rotation window" in late.message
    short = generate_ca("example.org", NOW - dt.timedelta(minutes=90), validity=dt.timedelta(hours=2))
    inside = checks.check_trust_domain(trust_domain({"ca": {"validity": "2h", "rotateBefore": "1h"},
                                                     "certificates": {"maxTTL": "1h"}},
                                                    rotation={"phase": "Preparing"}), short.certificate, NOW, "s")
    assert inside.failed and "rotation window (1h before expiry)" in inside.message and "Preparing" in inside.message
    assert checks.check_trust_domain(trust_domain(ready=False), td_ca.certificate, NOW, "s").failed
    unreadable = checks.check_trust_domain(trust_domain(), None, NOW, "Secret meshtls-system/x: 403")
    assert unreadable.failed and "cannot read the CA" in unreadable.message
    from_status = checks.check_trust_domain(trust_domain({"ca": {"rotateBefore": "720h"}},
                                                         caNotAfter=ts(dt.timedelta(days=100))), None, NOW, "s")
    assert from_status.status == "ok"


def test_check_bundle(td_ca: CertificateAuthority) -> None:
    fp = td_ca.fingerprint
    assert checks.check_bundle("shop", "meshtls-bundle", bundle_of(td_ca), "example.org", td_ca.certificate, fp,
                               NOW) is None
    missing = checks.check_bundle("shop", "meshtls-bundle", None, "example.org", td_ca.certificate, fp, NOW)
    assert missing is not None and "missing" in missing.message
    stale = bundle_of(td_ca, at=NOW - dt.timedelta(hours=30))
    past = checks.check_bundle("shop", "meshtls-bundle", stale, "example.org", td_ca.certificate, fp, NOW)
    assert past is not None and "past its nextUpdate" in past.message
    other = generate_ca("example.org", T0)
    wrong = checks.check_bundle("shop", "meshtls-bundle", bundle_of(other), "example.org", td_ca.certificate, fp,
                                NOW)
    assert wrong is not None and "does not contain" in wrong.message
    no_crl = {"data": {"ca.crt": td_ca.roots_pem.decode()}}
    assert "no crl.pem" in str(checks.check_bundle("shop", "b", no_crl, "example.org", td_ca.certificate, fp, NOW))


def webhook_config(ca_pem: bytes) -> dict[str, Any]:
    return {"metadata": {"name": "meshtls-injector"}, "webhooks": [
        {"name": "pod.inject.meshtls.dev", "failurePolicy": "Ignore",
         "clientConfig": {"caBundle": base64.b64encode(ca_pem).decode(), "url": "https://127.0.0.1:9443/inject"}}]}


def test_check_webhook(td_ca: CertificateAuthority) -> None:
    from meshtls.pki.serving import issue_serving_certificate

    assert checks.check_webhook(None, None, "meshtls-injector", NOW).status == "skip"
    good = checks.check_webhook(webhook_config(td_ca.certificate_pem()), None, "meshtls-injector", NOW)
    assert good.status == "ok" and "failurePolicy Ignore" in good.message
    bad = webhook_config(b"")
    bad["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(b"not pem").decode()
    assert "not a PEM" in checks.check_webhook(bad, None, "meshtls-injector", NOW).message
    soon = generate_ca("meshtls-webhook", NOW - dt.timedelta(days=1), validity=dt.timedelta(days=20))
    expiring = checks.check_webhook(webhook_config(soon.certificate_pem()), None, "meshtls-injector", NOW)
    assert expiring.failed and "less than 30d" in expiring.message
    serving = issue_serving_certificate(td_ca, ["localhost"], ["127.0.0.1"], NOW, dt.timedelta(days=90))
    secret = SecretSnapshot(exists=True, name="meshtls-webhook-tls", data={"tls.crt": serving.cert_chain_pem})
    ok = checks.check_webhook(webhook_config(td_ca.certificate_pem()), secret, "meshtls-injector", NOW)
    assert ok.status == "ok" and "serving certificate expires in" in ok.message
    other = generate_ca("meshtls-webhook", NOW)
    mismatch = checks.check_webhook(webhook_config(other.certificate_pem()), secret, "meshtls-injector", NOW)
    assert mismatch.failed and "not signed" in mismatch.message


def test_summarise() -> None:
    assert checks.summarise("x", 0, [], "Ready")[0].status == "skip"
    assert checks.summarise("x", 3, [], "Ready")[0].message == "3 of 3 Ready"
    failing = [checks.fail("WorkloadIdentity a/b", "no")]
    assert checks.summarise("x", 3, failing, "Ready") == failing


# --- inspect ---------------------------------------------------------------------------------------------------------


def test_inspect_report_and_rendering(td_ca: CertificateAuthority, svid: IssuedCertificate) -> None:
    report = inspect_report("secret shop/web-mtls", svid.cert_chain_pem, NOW, key_pem=svid.key_pem,
                            bundle=bundle_of(td_ca), bundle_name="shop/meshtls-bundle", secret_ca_pem=svid.ca_pem)
    assert report["ok"] and report["spiffeID"] == "spiffe://example.org/ns/shop/sa/web"
    assert report["keyMatches"] is True and report["revoked"] is False
    assert report["validity"]["state"] == "valid" and "34% of its 1h1m lifetime used" in report["validity"]["text"]
    out = plain(inspect_renderable(report))
    assert "spiffe://example.org/ns/shop/sa/web" in out and "✓ shop/meshtls-bundle (CRL #2) accepts it" in out
    assert "leaf" in out and svid.serial_hex in out
    revoked = inspect_report("f", svid.cert_chain_pem, NOW, bundle=bundle_of(td_ca, [svid.serial_number]),
                             bundle_name="shop/meshtls-bundle")
    assert not revoked["ok"] and revoked["revoked"] is True and "is revoked" in revoked["checks"][0]["message"]
    absent = inspect_report("f", svid.cert_chain_pem, NOW, bundle=None, bundle_name="shop/meshtls-bundle")
    assert not absent["ok"] and "not found" in absent["checks"][0]["message"]
    # inspect and check give one verdict: another trust domain's bundle names what it holds
    foreign = inspect_report("f", svid.cert_chain_pem, NOW, bundle=bundle_of(generate_ca("other.org", T0)),
                             bundle_name="shop/meshtls-bundle")
    assert not foreign["ok"] and "none of them the issuer" in foreign["checks"][0]["message"]
    later = inspect_report("f", svid.cert_chain_pem, NOW + dt.timedelta(hours=3))
    assert later["validity"]["state"] == "expired" and not later["ok"]


# --- argument handling (no cluster needed) ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["renew"], ["renew", "web", "--all"], ["renew", "-A", "web"], ["revoke", "web", "--reason", "nope"],
    ["renew", "web", "--timeout", "soon"], ["status", "--events", "-1"],
])
def test_bad_input_is_one_line_and_exit_2_before_any_cluster_call(argv: list[str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--kubeconfig", "/nonexistent/kubeconfig"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_kubeconfig_and_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["status", "--kubeconfig", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "none.crt")]) == 2
    assert main(["inspect", "secret"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_inspect_file_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca = generate_ca("example.org", now)
    cert = issue_svid(ca, parse_spiffe_id("spiffe://example.org/ns/shop/sa/web"), now, dt.timedelta(hours=1))
    (tmp_path / "tls.crt").write_bytes(cert.cert_chain_pem)
    (tmp_path / "tls.key").write_bytes(cert.key_pem)
    assert main(["inspect", str(tmp_path / "tls.crt"), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keyMatches"] is True and report["serial"] == cert.serial_hex
    assert report["validity"]["state"] == "valid" and report["checks"] == []
    other = issue_svid(ca, parse_spiffe_id("spiffe://example.org/ns/a/sa/b"), now, dt.timedelta(hours=1))
    (tmp_path / "tls.key").write_bytes(other.key_pem)
    assert main(["inspect", str(tmp_path / "tls.crt")]) == 1
    assert "does NOT match" in capsys.readouterr().out


def test_every_cluster_command_takes_kubeconfig_context_and_output() -> None:
    parser = build_parser()
    for argv in (["status"], ["renew", "x"], ["revoke", "x", "--reason", "superseded"], ["inspect", "secret", "x"],
                 ["check"], ["watch"]):
        args = parser.parse_args([*argv, "--kubeconfig", "k", "--context", "c", "-o", "json"])
        assert (args.kubeconfig, args.context, args.output) == ("k", "c", "json")


# --- the Grafana dashboard -----------------------------------------------------------------------------------------


def test_dashboard_uses_only_metrics_that_are_exported() -> None:
    import re

    from meshtls.controller import metrics
    from meshtls.proxy.admin import Gauges, Stats, render_metrics

    stats = Stats()
    stats.handshakes[("inbound", "success")] += 1
    stats.rejections[("inbound", "not_allowed")] += 1
    text = render_metrics(stats, Gauges(True, 1.0, 0.5, "ab", "spiffe://x/y", 1, 1, 2.0, 1)).decode()
    exported = set(re.findall(r"^(meshtls_proxy_[a-z_]+)", text, re.M))
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    for family in metrics.REGISTRY.collect():
        exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
    dashboard = json.loads((Path(__file__).parents[1] / "charts" / "dashboards" / "meshtls.json").read_text())
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\b(meshtls_[a-z_]+)", target["expr"]))
            assert target["datasource"]["uid"] == "${datasource}"
    assert used and used <= exported, used - exported
    assert {"meshtls_proxy_handshakes_total", "meshtls_proxy_rejections_total", "meshtls_proxy_received_bytes_total",
            "meshtls_proxy_certificate_expiry_timestamp_seconds", "meshtls_certificate_expiration_timestamp_seconds",
            "meshtls_ca_expiration_timestamp_seconds"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
