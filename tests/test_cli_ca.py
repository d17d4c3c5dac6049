"""`meshtls ca rotate | status` without a cluster: the pure views and decisions over sample TrustDomain bodies, and
the commands against an in-memory stand-in for the API (the real API server is in e2e/test_cli_ca.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import itertools
import json
from typing import Any

import pytest

from meshtls.cli.commands import ca as ca_command
from meshtls.cli.errors import CommandFailed
from meshtls.cli.main import build_parser, main
from meshtls.cli.output import Output
from meshtls.cli.views import trust_domains
from meshtls.kube.client import ApiError
from meshtls.kube.queries import Connection
from meshtls.policy.ca_rotation import PREPARING, ROTATING, STABLE, RotationState, next_rotation_step

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
OLD, NEW = "a" * 64, "b" * 64


def td(name: str = "example.org", ready: bool | None = True, phase: str | None = STABLE,
       last_request: str | None = None, brought: str | None = None, signing: str = OLD, nxt: str | None = None,
       previous: str | None = None, propagation: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ca": {}}
    if brought:
        spec["ca"]["secretRef"] = {"name": brought}
    if propagation:
        spec["ca"]["propagationDelay"] = propagation
    status: dict[str, Any] = {"caFingerprint": signing, "caNotAfter": "2027-11-30T12:00:00Z", "crlNumber": 3,
                              "crlEntries": 1, "conditions": []}
    if ready is not None:
        status["conditions"].append({"type": "Ready", "status": "True" if ready else "False",
                                     "reason": "CAReady" if ready else "CASecretMissing", "message": "m",
                                     "lastTransitionTime": "2026-11-30T11:00:00Z"})
    if phase is not None:
        status["rotation"] = {"phase": phase, "since": "2026-11-30T11:59:00Z", "signingFingerprint": signing,
                              "nextFingerprint": nxt, "previousFingerprint": previous,
                              "retireAfter": "2026-11-30T13:00:05Z" if phase == ROTATING else None,
                              "lastRequest": last_request}
    return {"metadata": {"name": name}, "spec": spec, "status": status}


# --- status rows and table -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("phase", "brought"), list(itertools.product([STABLE, PREPARING, ROTATING, None],
                                                                       [None, "team-ca"])))
def test_row_carries_every_column_with_full_fingerprints(phase: str | None, brought: str | None) -> None:
    body = td(phase=phase, brought=brought, nxt=NEW if phase == PREPARING else None,
              previous=NEW if phase == ROTATING else None)
    row = trust_domains.trust_domain_row(body)
    assert row["name"] == "example.org" and row["ready"] == "True" and row["caFingerprint"] == OLD
    assert row["phase"] == (phase or STABLE) and row["crlNumber"] == 3 and row["crlEntries"] == 1
    assert row["source"] == (f"secretRef {brought}" if brought else "generated")
    assert row["nextFingerprint"] == (NEW if phase == PREPARING else None)
    assert row["previousFingerprint"] == (NEW if phase == ROTATING else None)
    out = io.StringIO()
    Output("table", file=out).show(trust_domains.trust_domains_table([row], NOW))
    header, line = out.getvalue().splitlines()[:2]
    for column in trust_domains.CA_COLUMNS:
        assert column in header
    assert f"sha256:{OLD[:12]}" in line and "#3" in line and (phase or STABLE) in line
    assert "\x1b[" not in out.getvalue()


def test_a_trust_domain_the_operator_never_answered_has_dashes() -> None:
    row = trust_domains.trust_domain_row({"metadata": {"name": "new.example"}})
    assert row["ready"] == "Unknown" and row["phase"] is None and row["caFingerprint"] is None
    out = io.StringIO()
    Output("table", file=out).show(trust_domains.trust_domains_table([row], NOW))
    assert "new.example" in out.getvalue() and "Unknown" in out.getvalue()


# --- may a rotation be asked for? ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ready", "phase", "brought"),
                         list(itertools.product([True, False, None], [STABLE, PREPARING, ROTATING, "Odd", None],
                                                [None, "team-ca"])))
def test_rotation_refusal_over_readiness_phase_and_ca_source(ready: bool | None, phase: str | None,
                                                              brought: str | None) -> None:
    why = trust_domains.rotation_refusal(td(ready=ready, phase=phase, brought=brought))
    if brought:  # first: whatever else, a brought CA is rotated by replacing its Secret
        assert why is not None and "spec.ca.secretRef: Secret team-ca" in why and "replacing that Secret" in why
    elif ready is not True:
        assert why is not None and "is not Ready" in why
        assert ("CASecretMissing" in why) if ready is False else ("no Ready condition yet" in why)
    elif phase == PREPARING:
        assert why is not None and "already rotating" in why
    elif phase == ROTATING:
        assert why is not None and "still retiring the old CA" in why
    elif phase == "Odd":
        assert why is not None and "unknown rotation phase" in why
    else:
        assert why is None


def test_default_wait_is_the_propagation_delay_plus_a_margin() -> None:
    assert trust_domains.default_wait(td(propagation="10s")) == dt.timedelta(seconds=70)
    assert trust_domains.default_wait(td()) == dt.timedelta(seconds=150)  # the 90 s default delay
    # a spec the API would refuse
    assert trust_domains.default_wait(td(propagation="soon")) == dt.timedelta(seconds=150)


# --- how far has it got? ---------------------------------------------------------------------------------------------

REQUEST = "20261130T120000Z-1a2b3c4d"


def test_rotation_progress_follows_requested_preparing_rotating() -> None:
    steps = [
        (td(), trust_domains.REQUESTED, False),  # the operator has not taken it yet
        (td(phase=PREPARING, last_request=REQUEST, nxt=NEW), PREPARING, False),
        (td(phase=ROTATING, last_request=REQUEST, signing=NEW, previous=OLD), ROTATING, True),
        # the old CA already retired (a very short maxTTL): signing switched all the same
        (td(phase=STABLE, last_request=REQUEST, signing=NEW), ROTATING, True),
    ]
    for body, phase, switched in steps:
        progress = trust_domains.rotation_progress(body, REQUEST, OLD)
        assert (progress.phase, progress.switched, progress.failure) == (phase, switched, None)
    preparing = trust_domains.rotation_progress(steps[1][0], REQUEST, OLD)
    assert f"sha256:{NEW[:12]}" in preparing.message and preparing.since == "2026-11-30T11:59:00Z"


def test_a_previous_request_is_not_this_one() -> None:
    """The status shows a rotation answered for another request id: still waiting for ours."""
    for phase in (PREPARING, ROTATING, STABLE):
        body = td(phase=phase, last_request="20261129T000000Z-00000000", signing=NEW)
        progress = trust_domains.rotation_progress(body, REQUEST, OLD)
        assert progress.phase == trust_domains.REQUESTED and not progress.switched and progress.failure is None


def test_rotation_progress_fails_on_ready_false_or_a_request_taken_without_a_rotation() -> None:
    for phase in (None, PREPARING, ROTATING):
        failed = trust_domains.rotation_progress(td(ready=False, phase=phase, last_request=REQUEST), REQUEST, OLD)
        assert failed.failure is not None and "Ready=False (CASecretMissing: m)" in failed.failure
    odd = trust_domains.rotation_progress(td(phase=STABLE, last_request=REQUEST), REQUEST, OLD)
    assert odd.failure is not None and "same CA" in odd.failure


def test_request_ids_are_served_once_by_the_operators_decision() -> None:
    """The ids `ca rotate` writes against policy.ca_rotation: a fresh one starts a rotation, the same one again
    (the annotation left in place after the rotation) does not."""
    ids = set()
    for _ in range(20):
        args = argparse.Namespace(name="example.org", wait=False, timeout=None, output="json")
        fake = FakeKube([td()])
        ca_command.rotate(args, Connection(fake, "https://fake", "default"))  # type: ignore[arg-type]
        ids.add(fake.annotations["example.org"]["meshtls.dev/rotate-ca"])
    assert len(ids) == 20
    far = NOW + dt.timedelta(days=300)
    for request in ids:
        served = RotationState(STABLE, NOW, None, request)
        assert next_rotation_step(RotationState(), NOW, far, dt.timedelta(days=1), dt.timedelta(0),
                                  request).action == "start"
        assert next_rotation_step(served, NOW, far, dt.timedelta(days=1), dt.timedelta(0), request).action == "wait"


# --- the commands against an in-memory API ---------------------------------------------------------------------------


class FakeKube:
    """Only what `ca_command` calls: TrustDomains by name, and annotation patches (through `custom`)."""

    def __init__(self, bodies: list[dict[str, Any]], forbid_patch: bool = False) -> None:
        self.bodies = {b["metadata"]["name"]: b for b in bodies}
        self.annotations: dict[str, dict[str, Any]] = {}
        self.forbid_patch = forbid_patch
        self.custom = self

    def get_trust_domain(self, name: str) -> dict[str, Any] | None:
        return self.bodies.get(name)

    def list_trust_domains(self) -> list[dict[str, Any]]:
        return list(self.bodies.values())

    def patch_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                    body: dict[str, Any]) -> None:
        assert (group, version, plural) == ("meshtls.dev", "v1alpha1", "trustdomains")
        if self.forbid_patch:
            from kubernetes.client.exceptions import ApiException

            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"message": f'trustdomains.meshtls.dev "{name}" is forbidden: User "u" cannot patch'})
            raise exc
        self.annotations.setdefault(name, {}).update(body["metadata"]["annotations"])


def run(verb: str, fake: FakeKube, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int | str, str]:
    args = build_parser().parse_args(["ca", verb, *argv])
    try:
        code: int | str = getattr(ca_command, verb)(args, Connection(fake, "https://fake", "default"))  # type: ignore
    except CommandFailed as exc:
        code = str(exc)
    return code, capsys.readouterr().out


def test_unknown_trust_domain_names_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeKube([td("b.example"), td("a.example")])
    for verb in ("rotate", "status"):
        code, _ = run(verb, fake, capsys, "nope.example")
        assert code == "TrustDomain 'nope.example' not found; the cluster has: a.example, b.example"
    code, _ = run("rotate", FakeKube([]), capsys, "nope.example")
    assert code == "TrustDomain 'nope.example' not found; the cluster has no TrustDomains"
    assert not fake.annotations


def test_refused_rotations_write_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    for body in (td(brought="team-ca"), td(ready=False), td(phase=PREPARING), td(phase=ROTATING)):
        fake = FakeKube([body])
        code, _ = run("rotate", fake, capsys, "example.org")
        assert isinstance(code, str) and "example.org" in code
        assert not fake.annotations


def test_rotate_sets_the_operators_annotation_and_reports_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    from meshtls.api.constants import ANNOTATION_ROTATE_CA

    fake = FakeKube([td()])
    code, out = run("rotate", fake, capsys, "example.org", "-o", "json")
    assert code == 0
    result = json.loads(out)
    assert fake.annotations == {"example.org": {ANNOTATION_ROTATE_CA: result["request"]}}
    assert result["oldFingerprint"] == OLD and result["phases"][0]["phase"] == trust_domains.REQUESTED


def test_no_permission_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeKube([td()], forbid_patch=True)
    code, _ = run("rotate", fake, capsys, "example.org")
    assert isinstance(code, str) and code.startswith("no permission to patch TrustDomain example.org")
    assert "cannot patch" in code


def test_wait_times_out_naming_the_phase(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_command, "POLL", 0.01)
    code, out = run("rotate", FakeKube([td()]), capsys, "example.org", "--wait", "--timeout", "1s")
    assert isinstance(code, str) and code.startswith("timed out after 1 s waiting for the operator to take the "
                                                     "request (TrustDomain example.org, phase Requested)")
    assert "Requested" in out


def test_wait_follows_each_phase_and_stops_when_signing_switched(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_command, "POLL", 0.0)
    fake = FakeKube([td()])
    reads = iter(range(100))

    def operator_answers(name: str) -> dict[str, Any]:
        n = next(reads)
        request = fake.annotations[name]["meshtls.dev/rotate-ca"]
        if n < 2:
            return td()
        if n < 4:
            return td(phase=PREPARING, last_request=request, nxt=NEW)
        return td(phase=ROTATING, last_request=request, signing=NEW, previous=OLD)

    fake.get_trust_domain = operator_answers  # type: ignore[method-assign]
    fake.bodies = {"example.org": td()}
    monkeypatch.setattr(ca_command, "_get_trust_domain", lambda kube, name: td())
    code, out = run("rotate", fake, capsys, "example.org", "--wait", "--timeout", "5s")
    assert code == 0, code
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["Requested", "Preparing", "Rotating"]
    assert lines[1].startswith("2026-11-30T11:59:00Z  Preparing") and "signing switched" in lines[2]


def test_status_as_data_and_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeKube([td("b.example", phase=PREPARING, nxt=NEW), td("a.example")])
    code, out = run("status", fake, capsys, "-o", "json")
    assert code == 0
    assert [(i["name"], i["phase"]) for i in json.loads(out)["items"]] == [("a.example", STABLE),
                                                                          ("b.example", PREPARING)]
    code, out = run("status", fake, capsys, "b.example", "-o", "yaml")
    assert code == 0 and "nextFingerprint: " + NEW in out and "conditions:" in out
    code, out = run("status", fake, capsys, "b.example")
    assert code == 0 and "Conditions:" in out and "Preparing" in out


@pytest.mark.parametrize("argv", [["ca"], ["ca", "rotate"], ["ca", "nope"], ["ca", "rotate", "x", "--timeout", "soon"],
                                  ["ca", "rotate", "x", "--timeout", "0s"], ["ca", "status", "-o", "xml"]])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main([*argv, "--kubeconfig", "/nonexistent/kubeconfig"])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_api_errors_other_than_forbidden_are_not_swallowed() -> None:
    class Broken(FakeKube):
        def get_trust_domain(self, name: str) -> dict[str, Any] | None:
            raise ApiError(500, "Internal", "boom")

    with pytest.raises(ApiError):
        ca_command.status(argparse.Namespace(name="x", output="table"), Connection(Broken([]), "s", "d"))  # type: ignore
