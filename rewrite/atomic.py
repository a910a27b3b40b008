"""Nothing is left half-written: every output goes to a temporary name and is renamed when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary file path beside `path`; renames it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir_files(directory: str | Path):
    """Yields a temporary directory; on success its files are moved into `directory` (each renamed atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial.", dir=directory))
    try:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
