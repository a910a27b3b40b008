"""Nothing is left half-written or lost: outputs go to a temporary name and are renamed when complete.

Temporaries are named `.rewrite-tmp-<pid>-*`, so the next write in the same directory removes those
of a process that died (a SIGKILL leaves them behind) and never touches a living process's. They get
the mode a plain `open`/`mkdir` would give (0666 / 0777 less the umask), so a renamed output is as
readable as any other tool's; a write the file system refuses names the output, never the temporary.
"""
from __future__ import annotations

import contextlib
import errno
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path: str | Path) -> None:
    """Gives a finished temporary file or tree, before its rename, the modes `open` and `mkdir` would have
    (0666 / 0777 less the umask): mkstemp and mkdtemp make 0600 / 0700, and so do some writers."""
    mask = _umask()
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def _concerns(error: OSError, output: Path, staged: Path | None) -> bool:
    """Whether the file system refused the output itself (its temporary, it, or a directory above it),
    not an input read while writing it."""
    if error.filename is None:
        return True
    failed = Path(os.path.abspath(error.filename))
    targets = [Path(os.path.abspath(output))] + ([Path(os.path.abspath(staged))] if staged else [])
    return any(failed == target or failed in target.parents or target in failed.parents for target in targets) or (
        failed.name.startswith(TMP_PREFIX))


def _refused(error: OSError, output: Path, what: str) -> RewriteError:
    reason = (error.strerror or str(error)).lower()
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "write to a directory you may write to"
    else:
        fix = "write elsewhere"
    return RewriteError(f"{what} {str(output)!r} could not be written ({reason}); {fix}")


@contextlib.contextmanager
def naming_output(output: str | Path, staged: str | Path | None = None, what: str = "output"):
    """Turns the file system's refusal to write `output` (through its temporary `staged`) into one
    sentence naming `output`; errors about other files pass through."""
    try:
        yield
    except OSError as error:
        if not _concerns(error, Path(output), Path(staged) if staged else None):
            raise
        raise _refused(error, Path(output), what) from error


def check_directory(directory: str | Path, what: str = "directory") -> Path:
    """Refuses a directory that cannot be created because it, or a parent, is a file."""
    directory = Path(directory)
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RewriteError(f"{what} {str(directory)!r} cannot be written: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RewriteError(f"{what} {str(directory)!r} cannot be written: {str(parent)!r} is not writable; "
                                   "write to a directory you may write to")
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


def check_output_dir(directory: str | Path, *, overwrite: bool) -> Path:
    """Refuses, before any work, an output directory that is a file, or that already holds files (hidden
    ones, such as temporaries and locks, aside), unless `overwrite`."""
    directory = check_directory(directory, "output directory")
    found = sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []
    if found and not overwrite:
        raise RewriteError(f"output directory {str(directory)!r} already holds {found[0]}"
                           f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}; pass --overwrite to replace "
                           "what is there, or write elsewhere")
    return directory


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary file path beside `path`; renames it to `path` only if the block succeeds."""
    path = check_output(path)
    with naming_output(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name + "."), suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with naming_output(path, tmp):
            yield tmp
            share(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir_files(directory: str | Path, *, overwrite: bool = True):
    """Yields a temporary directory; on success its files are moved into `directory` (each renamed
    atomically). Without `overwrite`, files already in `directory` under the same names are refused."""
    directory = check_directory(directory)
    created = not directory.exists()
    with naming_output(directory, what="output directory"):
        directory.mkdir(parents=True, exist_ok=True)
        sweep_stale(directory)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=directory))
    try:
        with naming_output(directory, tmp, what="output directory"):
            yield tmp
            clashes = sorted(item.name for item in tmp.iterdir() if (directory / item.name).exists())
            if clashes and not overwrite:
                raise RewriteError(f"{str(directory)!r} already holds {', '.join(clashes)}, which this would "
                                   "replace; pass --overwrite to replace them, or write elsewhere")
            for item in sorted(tmp.iterdir()):
                share(item)
                os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
