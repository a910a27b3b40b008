"""Nothing is left half-written or lost: outputs go to a temporary name and are renamed when complete.

Temporaries are named `.rewrite-tmp-<pid>-*`, so the next write in the same directory removes those
of a process that died (a SIGKILL leaves them behind) and never touches a living process's.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from rewrite.errors import RewriteError

TMP_PREFIX = ".rewrite-tmp-"
_TMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: str | Path) -> None:
    """Removes the temporaries that dead processes left in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        match = _TMP_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def temp_prefix(name: str = "") -> str:
    return f"{TMP_PREFIX}{os.getpid()}-{name}"


def check_directory(directory: str | Path, what: str = "directory") -> Path:
    """Refuses a directory that cannot be created because it, or a parent, is a file."""
    directory = Path(directory)
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RewriteError(f"{what} {str(directory)!r} cannot be written: {str(parent)!r} is a file")
            break
    return directory


def check_output(path: str | Path, *, overwrite: bool = True, what: str = "output") -> Path:
    """Refuses an output path that cannot be written (a parent is a file, the path is a directory) or,
    without `overwrite`, that already exists; checked before any work so a refusal writes nothing."""
    path = Path(path)
    check_directory(path.parent, what)
    if path.is_dir():
        raise RewriteError(f"{what} {str(path)!r} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise RewriteError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary file path beside `path`; renames it to `path` only if the block succeeds."""
    path = check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name + "."), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir_files(directory: str | Path, *, overwrite: bool = True):
    """Yields a temporary directory; on success its files are moved into `directory` (each renamed
    atomically). Without `overwrite`, files already in `directory` under the same names are refused."""
    directory = check_directory(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    sweep_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=directory))
    try:
        yield tmp
        clashes = sorted(item.name for item in tmp.iterdir() if (directory / item.name).exists())
        if clashes and not overwrite:
            raise RewriteError(f"{str(directory)!r} already holds {', '.join(clashes)}, which this would replace; "
                               "pass --overwrite to replace them, or write elsewhere")
        for item in sorted(tmp.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
