"""Atomic writes: a reader sees either the old artefact or the complete new one, never half of it, and a process
killed at any moment (SIGKILL included: ``make test-chaos``) leaves one of the two in place."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _load_renameat2():
    """libc's renameat2 (Linux 3.15+, glibc 2.28+), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the existing paths ``a`` and ``b`` in one step (renameat2 with RENAME_EXCHANGE): at every moment each
    name leads to one of the two. False, with nothing changed, where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    # renameat2 through ctypes bypasses os.rename's audit event: raise it, so audit hooks see this rename like any
    # other (the chaos harness kills a process just before each rename of an artefact through such a hook)
    sys.audit("os.rename", a, b, -1, -1)
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), os.fspath(a), None, os.fspath(b))


def _discard(directory: Path, marker: str | None) -> None:
    """Remove a directory, its completion marker first, so that no moment leaves it looking complete when it is
    not (a kill halfway through rmtree would otherwise leave the marker beside half of the files)."""
    if marker is not None:
        (directory / marker).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def _host_prefix(name: str) -> str:
    """``.NAME.tmp-HOST-``: the start of every temporary sibling of ``name`` written on this host. The writer's PID
    and a random part follow (``_temporary_prefix``), so that a later writer can tell whose it is."""
    return f".{name}.tmp-{socket.gethostname()}-"


def _temporary_prefix(name: str) -> str:
    return f"{_host_prefix(name)}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_stale_temporaries(target: str | Path, *, marker: str | None = None) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by writers on this host that were killed (their process is
    gone), and return them. A killed writer cannot clean up after itself; the next writer of the same name does.
    Temporaries of live processes and of other hosts (a shared file system) are left alone: only their own host
    can tell whether their writer still runs."""
    target = Path(target)
    prefix = _host_prefix(target.name)
    removed = []
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        pid = path.name[len(prefix):].split("-", 1)[0] if path.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                _discard(path, marker)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_directory(target: str | Path, *, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it takes ``target``'s place in one step.

    An existing ``target`` is swapped with the new directory in one exchange, so a process killed at any moment
    leaves the previous directory or the complete new one at ``target``, never neither; the previous one, then
    in the temporary directory, is removed. (Where the file system cannot exchange it is moved aside first, and a
    kill between the two renames leaves it at ``.NAME.old-PID``.) ``marker`` names the file whose presence says the
    directory is complete: the caller writes it last (``atomic_file``), and a discarded directory loses it first.
    On any exception the temporary directory is removed and ``target`` is left as it was. Temporaries that killed
    writers on this host left beside ``target`` are removed first (``sweep_stale_temporaries``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(target, marker=marker)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target.name), dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif exchange(tmp, target):
            _discard(tmp, marker)  # the previous directory, now at the temporary name
        else:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            _discard(old, marker)
    except BaseException:
        _discard(tmp, marker)
        raise


@contextmanager
def atomic_file(path: str | Path, *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` for a writer (this process or another, a compiler say); on
    success it replaces ``path`` in one rename. On any exception the temporary file is removed and ``path`` is left
    as it was. ``make_parents=False`` fails instead of creating a missing parent directory (a derived file inside
    a dataset directory must never recreate a directory that a rebuild has just moved away)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.is_dir():
        sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
