"""testsupport.kubelet.write_atomic_volume writes volumes the way the kubelet's AtomicWriter does."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from testsupport.kubelet import DATA_DIR, read_volume, write_atomic_volume

TS_DIR = re.compile(r"\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d{9}")


def _hidden_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if TS_DIR.fullmatch(p.name))


def test_first_write_layout(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    assert write_atomic_volume(d, {"tls.crt": b"cert", "tls.key": b"key", "ca.crt": b"ca"})
    [ts] = _hidden_dirs(d)
    assert (d / DATA_DIR).is_symlink() and os.readlink(d / DATA_DIR) == ts
    for name, content in (("tls.crt", b"cert"), ("tls.key", b"key"), ("ca.crt", b"ca")):
        assert os.readlink(d / name) == f"{DATA_DIR}/{name}"
        assert (d / name).read_bytes() == content
        assert not (d / ts / name).is_symlink()
        assert (d / ts / name).stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(d)) == sorted([DATA_DIR, ts, "ca.crt", "tls.crt", "tls.key"])
    assert read_volume(d) == {"tls.crt": b"cert", "tls.key": b"key", "ca.crt": b"ca"}


def test_unchanged_content_is_not_rewritten(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    write_atomic_volume(d, {"a": b"1"})
    before = os.readlink(d / DATA_DIR)
    assert not write_atomic_volume(d, {"a": b"1"})
    assert os.readlink(d / DATA_DIR) == before


def test_update_swaps_data_and_removes_the_old_directory(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    write_atomic_volume(d, {"a": b"1", "b": b"1"})
    old = os.readlink(d / DATA_DIR)
    link_inode = os.lstat(d / "a").st_ino
    assert write_atomic_volume(d, {"a": b"2", "c": b"2"})
    new = os.readlink(d / DATA_DIR)
    assert new != old and _hidden_dirs(d) == [new]
    assert os.lstat(d / "a").st_ino == link_inode  # user-visible symlinks are created once, never replaced
    assert (d / "a").read_bytes() == b"2" and (d / "c").read_bytes() == b"2"
    assert not (d / "b").exists() and not (d / "b").is_symlink()  # a key that left the payload
    assert not (d / "..data_tmp").exists()


def test_nested_paths_and_invalid_names(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    write_atomic_volume(d, {"sub/x.pem": b"x", "top": b"t"})
    assert os.readlink(d / "sub") == f"{DATA_DIR}/sub"
    assert (d / "sub" / "x.pem").read_bytes() == b"x"
    for bad in ("../evil", "/abs", "a//b", "..data", "..hidden/x", ""):
        with pytest.raises(ValueError):
            write_atomic_volume(d, {bad: b"x"})


def test_readers_never_see_a_mixed_version(tmp_path: Path) -> None:
    """The point of the `..data` swap: a reader going through the visible symlinks sees old or new, never both."""
    d = tmp_path / "vol"
    write_atomic_volume(d, {"tls.crt": b"0", "tls.key": b"0"})
    stop = threading.Event()
    mixed: list[tuple[bytes, bytes]] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            # what a careful consumer does: resolve ..data once, then read both files from that directory
            try:
                base = d / os.readlink(d / DATA_DIR)
                crt, key = (base / "tls.crt").read_bytes(), (base / "tls.key").read_bytes()
            except FileNotFoundError:  # the old directory was removed between readlink and open: retry
                continue
            reads[0] += 1
            if crt != key:
                mixed.append((crt, key))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 200):
        v = str(i).encode()
        write_atomic_volume(d, {"tls.crt": v, "tls.key": v})
    stop.set()
    t.join()
    assert mixed == [] and reads[0] > 0
    assert (d / "tls.crt").read_bytes() == b"199" and len(_hidden_dirs(d)) == 1
