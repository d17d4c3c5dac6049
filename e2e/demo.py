"""`make demo`: meshtls on the local control plane (or $KUBECONFIG), live.

Starts the cluster (built once, cached), installs the CRDs, runs the operator, applies examples/, runs the Envoy
sidecar injected into the backend pod for real (the harness's kubelet) and shows the key exchange it negotiates, then
shows certificates being issued and rotated as they happen, deletes an identity and shows its revocation, and ends by
itself after a few rotations (or on Ctrl-C), leaving nothing running.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from kubernetes import client, config
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from testsupport.envoy import EnvoyContainer, EnvoyProcess

from e2e.demo_sidecars import DemoSidecars, demo_runtime
from e2e.harness import Cluster
from e2e.mesh import http_get
from e2e.operator_process import OperatorProcess, free_port
from meshtls.dataplane.config import OutboundRoute, SidecarConfig

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "shop"
TRUST_DOMAIN = "demo.meshtls.local"
ROTATIONS_TO_SHOW = int(os.environ.get("MESHTLS_DEMO_ROTATIONS", "2"))
MAX_SECONDS = int(os.environ.get("MESHTLS_DEMO_SECONDS", "180"))
console = Console()


def step(text: str) -> None:
    console.print(f"[bold cyan]==>[/] {text}")


def until(dt_text: str | None, now: dt.datetime) -> str:
    if not dt_text:
        return "-"
    seconds = (dt.datetime.fromisoformat(dt_text.replace("Z", "+00:00")) - now).total_seconds()
    return f"{seconds:5.0f}s" if seconds >= 0 else "now"


def identities_table(items: list[dict[str, Any]]) -> Table:
    now = dt.datetime.now(dt.UTC)
    table = Table(title=f"WorkloadIdentities in {NAMESPACE} (kubectl get wid -n {NAMESPACE})", expand=True)
    for column in ("NAME", "SPIFFE ID", "READY", "SERIAL", "EXPIRES", "RENEWS", "ROT", "SIDECAR"):
        table.add_column(column, no_wrap=column != "SPIFFE ID", overflow="fold")
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        status = item.get("status", {})
        ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
        ok = ready.get("status") == "True"
        table.add_row(item["metadata"]["name"], status.get("spiffeID", "-"),
                      "[green]True[/]" if ok else f"[red]{ready.get('reason', 'Pending')}[/]",
                      (status.get("serialNumber") or "-")[:8] + "…", until(status.get("notAfter"), now),
                      until(status.get("renewalTime"), now), str(status.get("rotations", 0)),
                      status.get("dataPlane", "-"))
    return table


def events_panel(lines: list[str]) -> Panel:
    rows = [Text.from_markup(line, overflow="ellipsis") for line in lines[-10:]]
    for row in rows:
        row.no_wrap = True
    text = Text("\n").join(rows)
    return Panel(text or Text("(waiting for events)"), title="Events (kubectl get events -w)", border_style="dim")


def main() -> int:
    started = time.monotonic()
    step("starting the local Kubernetes control plane (first run builds it from source: several minutes)")
    cluster = Cluster.start(cleanup_on_exit=True, log=lambda m: console.print(f"    {m}", style="dim"))
    operator: OperatorProcess | None = None
    sidecars: DemoSidecars | None = None
    logs = Path(tempfile.mkdtemp(prefix="meshtls-demo-"))
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        step(f"installing the CRDs (kubectl apply -f crds/) on {cluster.api_server_url}")
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/trustdomains.meshtls.dev",
                        "crd/workloadidentities.meshtls.dev")
        cluster.kubectl("create", "namespace", "meshtls-system", check=False)
        step("running the operator: meshtls operator -A --webhook-port … (logs: "
             f"{logs}/operator.log)")
        operator = OperatorProcess(cluster.kubeconfig, logs, extra_args=[
            "--webhook-port", str(free_port()), "--webhook-failure-policy", "Ignore"])
        operator.start()
        step("applying examples/: a TrustDomain with 30 s certificates, three identities, two pods")
        for manifest in sorted((REPO / "examples").glob("*.yaml")):
            if manifest.name.startswith("30-"):  # pods after their identities exist, as a user would
                cluster.kubectl("wait", "--for=condition=Ready", "workloadidentity", "--all", "-n", NAMESPACE,
                                "--timeout=60s")
            cluster.kubectl("apply", "-f", str(manifest))
            console.print(f"    kubectl apply -f examples/{manifest.name}", style="dim")
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        show_injection(core)
        sidecars = DemoSidecars(api, NAMESPACE, logs / "pods", demo_runtime(lambda m: step(m)))
        step("running the example pods' injected sidecars for real, as the kubelet would (backend: Envoy, "
             "frontend: meshtls-proxy)")
        sidecars.start(["backend", "frontend"], app_port=8080)
        response, groups = sidecars.call("frontend", "backend", 8443)
        console.print(f"    frontend's certificate → backend's sidecar :8443 → app: {response!r}; "
                      f"key exchange {groups}", style="dim")
        envoy_demo(sidecars, core, logs)
        step(f"watching certificates being issued and rotated (ends after {ROTATIONS_TO_SHOW} rotations each, "
             "or Ctrl-C)")
        events: list[str] = []
        seen: set[str] = set()
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() - started < MAX_SECONDS:
                items = custom.list_namespaced_custom_object("meshtls.dev", "v1alpha1", NAMESPACE,
                                                             "workloadidentities")["items"]
                collect_events(core, seen, events)
                live.update(Group(identities_table(items), events_panel(events)))
                if items and all(i.get("status", {}).get("rotations", 0) >= ROTATIONS_TO_SHOW for i in items):
                    break
                time.sleep(0.5)
        revoke_demo(cluster, core, seen, events)
    except KeyboardInterrupt:
        interrupted = True
        console.print("\n[yellow]interrupted: cleaning up[/]")
    finally:
        if sidecars is not None:
            sidecars.stop()
        if operator is not None:
            operator.stop()
        if cluster.owned:
            step("stopping the control plane")
            cluster.stop()
        else:
            cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
            cluster.kubectl("delete", "trustdomain", TRUST_DOMAIN, "--wait=false", check=False)
    step(f"done in {time.monotonic() - started:.0f} s; nothing left running")
    return 130 if interrupted else 0


def show_injection(core: client.CoreV1Api) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(NAMESPACE).items
        if len(pods) >= 2:
            break
        time.sleep(0.5)
    for pod in core.list_namespaced_pod(NAMESPACE).items:
        containers = [c.name for c in pod.spec.init_containers or []] + [c.name for c in pod.spec.containers]
        injected = [c for c in containers if c in ("meshtls-proxy", "meshtls-envoy")]
        mark = f"[green]injected ({injected[0]})[/]" if injected else "[yellow]not injected[/]"
        console.print(f"    pod {pod.metadata.name}: containers {containers} → {mark}")


def negotiated_groups(metrics: str, family: str) -> dict[str, float]:
    """Envoy's per-curve handshake counters by group, from its Prometheus text (as a scraper reads it)."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        group = re.search(r'envoy_ssl_curve="([^"]+)"', line) if line.startswith(family + "{") else None
        if group:
            out[group.group(1)] = out.get(group.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def envoy_demo(sidecars: DemoSidecars, core: client.CoreV1Api, workdir: Path) -> None:
    """The backend pod's Envoy (already running from what meshtls injected and rendered): frontend's certificate
    calls it twice, as meshtls-proxy would (this Python's ssl) and through an Envoy client. The groups come from the
    backend Envoy's own stats."""
    client_envoy: EnvoyProcess | None = None
    try:
        sidecar = sidecars.sidecars["backend"]
        envoy = sidecar.process
        assert isinstance(envoy, EnvoyContainer), "the backend example runs on Envoy (examples/20-identities.yaml)"
        console.print(f"    {envoy.ready().stdout.strip()} (its readiness probe: meshtls-envoy ready)", style="dim")
        frontend = core.read_namespaced_secret("frontend-mtls", NAMESPACE).data
        identity = workdir / "frontend-identity"
        identity.mkdir(exist_ok=True)
        for key in ("tls.crt", "tls.key"):
            (identity / key).write_bytes(base64.b64decode(frontend[key]))
        bundle = sidecar.host_path("/var/run/meshtls/bundle")
        before = negotiated_groups(envoy.metrics(), "envoy_listener_ssl_curves")
        context = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
        context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
        context.load_cert_chain(identity / "tls.crt", identity / "tls.key")
        with context.wrap_socket(socket.create_connection(("127.0.0.1", 8443), timeout=10)) as conn:
            conn.sendall(b"GET /from-python HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
            reply = conn.recv(4096).split(b"\r\n")[0].decode()
        after = negotiated_groups(envoy.metrics(), "envoy_listener_ssl_curves")
        groups = sorted(g for g, v in after.items() if v > before.get(g, 0))
        console.print(f"    frontend's certificate over {ssl.OPENSSL_VERSION} (the demo's own Python): {reply}; "
                      f"backend's Envoy negotiated [bold]{', '.join(groups)}[/]")
        port, admin = free_port(), free_port()
        client_envoy = EnvoyProcess(SidecarConfig(
            spiffe_id=f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/frontend", identity_dir=str(identity),
            bundle_dir=str(bundle), admin_port=admin,
            outbound=(OutboundRoute(port, "127.0.0.1:8443", f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/backend"),)),
            workdir / "frontend-envoy-config", "frontend-envoy").start()
        before = after
        status, _ = http_get(port, "/from-envoy")
        after = negotiated_groups(envoy.metrics(), "envoy_listener_ssl_curves")
        groups = sorted(g for g, v in after.items() if v > before.get(g, 0))
        console.print(f"    frontend's certificate through an Envoy client: HTTP {status}; backend's Envoy "
                      f"negotiated [bold green]{', '.join(groups)}[/] (hybrid post-quantum)")
        console.print("    (from the backend Envoy's /stats/prometheus: envoy_listener_ssl_curves{envoy_ssl_curve=…})",
                      style="dim")
    except Exception as exc:
        console.print(f"    [red]the backend's Envoy did not serve here: {exc}[/]")
    finally:
        if client_envoy is not None:
            client_envoy.stop()


def collect_events(core: client.CoreV1Api, seen: set[str], out: list[str]) -> None:
    for e in sorted(core.list_namespaced_event(NAMESPACE).items,
                    key=lambda e: e.last_timestamp or e.event_time or dt.datetime.min.replace(tzinfo=dt.UTC)):
        if e.metadata.uid in seen or e.reason not in ("Issued", "Rotated", "Revoked", "Repaired", "SecretConflict"):
            continue
        seen.add(e.metadata.uid)
        when = (e.last_timestamp or dt.datetime.now(dt.UTC)).strftime("%H:%M:%S")
        colour = {"Issued": "green", "Rotated": "cyan", "Revoked": "red"}.get(e.reason, "yellow")
        out.append(f"{when} [{colour}]{e.reason:8}[/] {e.involved_object.name}: {short_message(e.message)}")


def short_message(message: str) -> str:
    """'serial 27a5b7… -> 481eb7…, expires in 29s' rather than the full Event text, to fit a terminal."""
    message = re.sub(r"\b([0-9a-f]{8})[0-9a-f]{8,}\b", r"\1…", message)
    message = re.sub(r"expires \S+ \(in (\w+)\)", r"expires in \1", message)
    return message.split(": renewal time")[0].replace(f"spiffe://{TRUST_DOMAIN}/", "")


def revoke_demo(cluster: Cluster, core: client.CoreV1Api, seen: set[str], events: list[str]) -> None:
    secret = core.read_namespaced_secret("worker-mtls", NAMESPACE)
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"]))
    serial = format(leaf.serial_number, "x")
    step(f"deleting WorkloadIdentity worker (current serial {serial}): its certificates go on the CRL")
    cluster.kubectl("delete", "workloadidentity", "worker", "-n", NAMESPACE, "--wait=true", "--timeout=30s")
    crl = x509.load_pem_x509_crl(core.read_namespaced_config_map("meshtls-bundle", NAMESPACE).data["crl.pem"]
                                 .encode())
    revoked = crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    collect_events(core, seen, events)
    for line in [e for e in events if "Revoked" in e][-1:]:
        console.print("    " + line, overflow="fold")
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    verdict = "[green]on the CRL[/]" if revoked else "[red]NOT on the CRL[/]"
    console.print(f"    serial {serial}: {verdict} (CRL #{number}, {len(crl)} entries) in ConfigMap meshtls-bundle;"
                  f" Secret worker-mtls {'still exists' if _exists(core) else 'deleted'}")


def _exists(core: client.CoreV1Api) -> bool:
    try:
        core.read_namespaced_secret("worker-mtls", NAMESPACE)
    except client.exceptions.ApiException:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
