"""Starting, watching and stopping the component processes, by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path


class ComponentError(RuntimeError):
    """A component could not start or died; the message names it and its log file."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def spawn(argv: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    """Starts a component in its own session (so Ctrl-C in a terminal reaches only the harness), logging to
    a file.

    The harness may exit while the component runs on (`up`); its pid is all that is needed to stop it later.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc.pid


# Popen objects of the processes this Python process started, so they are reaped (no zombies) once they exit.
_children: dict[int, subprocess.Popen[bytes]] = {}


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not count)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def runs_binary(pid: int, binary: Path) -> bool:
    """Whether `pid` is still the process started from `binary` (not an unrelated one that got its pid)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()
    except OSError:
        return False
    return argv0 == str(binary) and alive(pid)


def stop(pids: Iterable[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still running after `grace` seconds; waits until all are gone."""
    pending = [p for p in pids if alive(p)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [p for p in pending if alive(p)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pending and time.monotonic() < deadline:
        time.sleep(0.05)
        pending = [p for p in pending if alive(p)]
    for pid in list(_children):
        if _children[pid].poll() is not None:
            del _children[pid]


def wait_reaped(pids: Iterable[int], timeout: float = 5.0) -> None:
    """Waits until exited processes are gone from the process table.

    Components outlive the `up` that started them, so init reaps them; where init reaps only now and then
    (some sandboxes), an exited component lingers as a zombie that `pgrep -f kube-apiserver` still lists.
    """
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if os.path.exists(f"/proc/{p}")]
        if pending:
            time.sleep(0.05)


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    watch: Callable[[], None] = lambda: None,
    interval: float = 0.1,
) -> None:
    """Polls `check` until it returns True; `watch` raises if a component died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        watch()
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def log_tail(log_file: Path, lines: int = 15, width: int = 300) -> str:
    """The last lines of a log (not the harness's `---` header lines), each indented and cut to `width`."""
    try:
        text = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  " + line[:width] for line in [t for t in text if not t.startswith("--- ")][-lines:])
