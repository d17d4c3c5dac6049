"""The pure parts of running containers from the image (testsupport.containers, testsupport.image); the real runs
are in e2e/test_image.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testsupport import image
from testsupport.containers import VenvRuntime, image_env, resolve_in_root, sidecar_runtime


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A Debian-like root: /var/run -> /run (absolute), /etc/alt -> ../opt (relative), a loop."""
    r = tmp_path / "root"
    for d in ("run", "var", "opt", "etc"):
        (r / d).mkdir(parents=True)
    os.symlink("/run", r / "var" / "run")
    os.symlink("../opt", r / "etc" / "alt")
    os.symlink("/etc/loop", r / "etc" / "loop")
    return r


@pytest.mark.parametrize(("path", "expected"), [
    ("/var/run/meshtls/identity", "run/meshtls/identity"),  # absolute link: inside the root, never the host's /run
    ("/etc/meshtls", "etc/meshtls"),  # missing components kept
    ("/etc/alt/x", "opt/x"),  # relative link
    ("/../../../etc/passwd", "etc/passwd"),  # `..` stops at the root
    ("//var/./run/", "run"),
])
def test_paths_resolve_inside_the_root(root: Path, path: str, expected: str) -> None:
    assert resolve_in_root(root, path) == root / expected


def test_a_symlink_loop_is_an_error(root: Path) -> None:
    with pytest.raises(OSError, match="too many symlinks"):
        resolve_in_root(root, "/etc/loop/x")


def test_image_env_reads_the_config_env() -> None:
    assert image_env({"Env": ["PATH=/opt/meshtls/bin:/usr/bin", "HOME=/tmp", "EMPTY="]}) == {
        "PATH": "/opt/meshtls/bin:/usr/bin", "HOME": "/tmp", "EMPTY": ""}
    assert image_env({}) == {}


def test_the_venv_runtime_runs_the_venv_programs(tmp_path: Path) -> None:
    argv, env = VenvRuntime().launch(["meshtls-proxy", "--config", "/x.yaml"], {"/etc/meshtls": tmp_path})
    assert Path(argv[0]).name in ("meshtls-proxy", "python", "python3") and argv[-2:] == ["--config", "/x.yaml"]
    assert env == dict(os.environ)  # the venv's process sees this machine's environment
    assert VenvRuntime().sees(tmp_path, "/etc/meshtls") == str(tmp_path)
    envoy, _ = VenvRuntime().launch(["envoy", "--version"], {})
    assert envoy[0].endswith("envoy/_bin/envoy")


def test_the_runtime_switch_names_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTLS_SIDECAR_FROM", "venv")
    assert isinstance(sidecar_runtime(), VenvRuntime)
    monkeypatch.setenv("MESHTLS_SIDECAR_FROM", "docker")
    with pytest.raises(ValueError, match="MESHTLS_SIDECAR_FROM='docker': allowed values are image, venv"):
        sidecar_runtime()


def test_the_source_hash_follows_what_the_build_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / "operator" / "meshtls" / "__pycache__").mkdir(parents=True)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        (repo / name).write_text(name)
    (repo / "operator" / "meshtls" / "a.py").write_text("a = 1\n")
    monkeypatch.setattr(image, "REPO", repo)
    first = image.source_hash("base-1")
    (repo / "operator" / "meshtls" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (repo / "operator" / ".import_linter_cache").mkdir()
    (repo / "operator" / ".import_linter_cache" / "meshtls.data.json").write_text("{}")
    (repo / "docs.md").write_text("not an input")
    assert image.source_hash("base-1") == first  # bytecode, tool caches, files outside the inputs
    assert image.source_hash("base-2") != first  # another base
    (repo / "operator" / "meshtls" / "a.py").write_text("a = 2\n")
    assert image.source_hash("base-1") != first  # the code
    (repo / "operator" / "meshtls" / "a.py").write_text("a = 1\n")
    assert image.source_hash("base-1") == first
    (repo / "Dockerfile").write_text("changed")
    assert image.source_hash("base-1") != first  # the Dockerfile


def test_pruning_keeps_what_a_run_elsewhere_still_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build in one worktree must not delete the image a CI run in another is running sidecars from (it did: the
    run's image was older by build time, though in use)."""
    monkeypatch.setattr(image, "CACHE", tmp_path)
    now = 1_000_000.0
    day = 86400.0

    def entry(tag: str, created: float) -> dict[str, object]:
        return {"id": tag, "names": [f"{image.IMAGE_NAME}:{image.SOURCE_TAG_PREFIX}{tag}"], "created": created}

    entries = [entry("new", now), entry("b", now - 1 * day), entry("c", now - 2 * day), entry("old", now - 3 * day),
               entry("used", now - 4 * day), {"id": "base", "names": ["localhost/meshtls-base:x"], "created": 0}]
    keep = f"{image.IMAGE_NAME}:{image.SOURCE_TAG_PREFIX}new"

    def used(tag: str, at: float) -> None:
        image._mark_used(f"{image.IMAGE_NAME}:{image.SOURCE_TAG_PREFIX}{tag}")
        os.utime(image._used_marker(f"{image.IMAGE_NAME}:{image.SOURCE_TAG_PREFIX}{tag}"), (at, at))

    assert [e["id"] for e in image.prunable(entries, keep, now)] == ["old", "used"]  # the newest 3 stay
    used("used", now - 60)  # the oldest build, asked for a minute ago by a run elsewhere: it stays, "c" goes
    assert [e["id"] for e in image.prunable(entries, keep, now)] == ["c", "old"]
    for tag in ("b", "c", "old"):  # every one in use lately: none goes, whatever the count
        used(tag, now - 120)
    assert image.prunable(entries, keep, now) == []
    for tag in ("b", "c", "old", "used"):  # left alone longer than the grace: back to the newest few
        used(tag, now - image.KEEP_USED_SECONDS - 1)
    assert len(image.prunable(entries, keep, now)) == 2 and "base" not in str(image.prunable(entries, keep, now))
