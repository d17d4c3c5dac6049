"""Writing outputs so that a failure never leaves a half-written directory behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_files_atomically(out_dir: Path, files: dict[str, bytes], private: frozenset[str] = frozenset()) -> None:
    """Write every file or none: stage them in a sibling temporary directory, then move each into place."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in files.items():
            path = stage / name
            path.write_bytes(data)
            os.chmod(path, 0o600 if name in private else 0o644)
        if not out_dir.exists():
            stage.rename(out_dir)
            return
        for name in files:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_file_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
