"""What the Dockerfile does, short of a container engine (there is none here): build the wheel from exactly the files
the image copies (pyproject.toml, README.md, operator/), install it into a clean virtualenv, and run both entry
points as the image's non-root user 65532 with no writable home.

Not exercised here: the base image, the dependency download inside the build (the clean virtualenv borrows the
project virtualenv's dependencies through a .pth file; `pip check` proves their versions satisfy the wheel), and a
read-only root filesystem (the runs only get a read-only home and PYTHONDONTWRITEBYTECODE, as in the image).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE_UID = 65532
SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # like the image's python:3.11; reachable by a non-root user


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed ({result.returncode}):\n" \
                                   f"{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Outside pytest's tmp dirs (mode 0700 under root): the image's user must be able to traverse it."""
    path = Path(tempfile.mkdtemp(prefix="meshtls-wheel-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    src = workdir / "src"  # what the Dockerfile's build stage copies, and nothing else (.dockerignore)
    (src / "operator").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "operator" / "meshtls", src / "operator" / "meshtls",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", workdir / "wheels", src)
    (built,) = (workdir / "wheels").glob("meshtls-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(workdir: Path, wheel: Path) -> Path:
    python = SYSTEM_PYTHON if SYSTEM_PYTHON.is_file() else Path(sys.executable)
    target = workdir / "venv"
    run(python, "-m", "venv", "--without-pip", target)
    run(sys.executable, "-m", "pip", "--python", target / "bin" / "python", "install", "--no-deps", "--quiet",
        wheel)
    purelib = Path(run(target / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                   .stdout.strip())
    # The dependencies, from the project's virtualenv (same CPython 3.11 ABI), after the wheel on sys.path.
    (purelib / "zz_meshtls_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for p in [workdir, *workdir.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o555 if p.is_dir() else p.stat().st_mode | 0o444)
    return target


def as_image_user(venv: Path, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
           "LANG": "C.UTF-8"}
    prefix: list[str] = []
    if os.geteuid() == 0:  # become the image's user, as the chart's securityContext makes it
        prefix = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
    return run(*prefix, *args, env=env, cwd=str(cwd or "/"))


def test_wheel_has_the_package_and_both_entry_points(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "meshtls/py.typed" in names
    for module in ("cli/main.py", "operator/handlers.py", "proxy/main.py", "pki/ca.py", "kube/client.py"):
        assert f"meshtls/{module}" in names, module
    assert not [n for n in names if n.startswith(("tests/", "e2e/", "operator/")) or "__pycache__" in n]
    assert "meshtls = meshtls.cli.main:main" in entry_points
    assert "meshtls-proxy = meshtls.proxy.main:main" in entry_points


def test_entry_points_run_from_a_clean_venv_as_the_image_user(venv: Path, workdir: Path) -> None:
    check = run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "check")
    assert "No broken requirements" in check.stdout
    where = as_image_user(venv, venv / "bin" / "python", "-c", "import meshtls; print(meshtls.__file__)")
    assert where.stdout.strip().startswith(str(venv)), f"meshtls imported from {where.stdout}, not the wheel"

    version = as_image_user(venv, "meshtls", "--version")
    assert version.stdout.strip() == "meshtls 0.1.0"
    assert "--config" in as_image_user(venv, "meshtls-proxy", "--help").stdout

    home = workdir / "home"  # a directory the user owns, like a mounted emptyDir (init-ca stages beside --out)
    home.mkdir()
    if os.geteuid() == 0:
        os.chown(home, IMAGE_UID, IMAGE_UID)
    out = home / "ca"
    as_image_user(venv, "meshtls", "pki", "init-ca", "--trust-domain", "example.org", "--out", out)
    assert (out / "ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (out / "ca.key").stat().st_uid == (IMAGE_UID if os.geteuid() == 0 else os.geteuid())
