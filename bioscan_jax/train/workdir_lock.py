"""One writer per workdir: a lock file holding the pid, host and start time of the run that owns it.

:func:`hold` creates ``<workdir>/.lock`` atomically (``O_CREAT | O_EXCL``). A second run on the
same workdir fails at once with :class:`WorkdirBusyError`, naming the holder. A lock whose pid is
dead on this host is stale (a killed run): it is taken over with a warning. A lock held from
another host is never taken over (its pid cannot be checked from here); the message says how to
remove it. The lock is removed when the run ends, also on an exception.

A workdir that cannot hold the lock (an existing regular file, a path through a file, a read-only
file system, no permission, a full disk) is a :class:`WorkdirError` with one line naming the
workdir and the problem (:func:`workdir_problem`): taking the lock is the first thing a run
writes, so this is found before any data are built.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import socket
import time

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used (not a directory, not writable); the message is one line."""


def _file_on_the_way(workdir: pathlib.Path) -> pathlib.Path | None:
    """The workdir itself or the first of its parents that exists and is not a directory."""
    for p in [*reversed(workdir.parents), workdir]:
        if p.exists() and not p.is_dir():
            return p
        if not p.exists():
            return None
    return None


def workdir_problem(workdir: str | os.PathLike, error: OSError) -> str:
    """One line for an ``OSError`` met while creating ``workdir`` or its lock file: what is
    wrong with the workdir, and what to do."""
    path = pathlib.Path(workdir)
    fix = "use another --workdir"
    in_the_way = _file_on_the_way(path.absolute())
    if in_the_way is not None or isinstance(error, (FileExistsError, NotADirectoryError)):
        if in_the_way is None or in_the_way == path.absolute():
            return f"workdir {workdir} is a file, not a directory; {fix}"
        return f"workdir {workdir}: {in_the_way} is a file, not a directory; {fix}"
    code = error.errno
    if code == errno.EROFS:
        return f"workdir {workdir} is not writable (read-only file system); {fix}"
    if code in (errno.EACCES, errno.EPERM):
        return f"workdir {workdir} is not writable (permission denied); {fix} or change its permissions"
    if code == errno.ENOSPC:
        return f"workdir {workdir} is not writable (no space left on the device); free some space or {fix}"
    if code == errno.EISDIR:
        return f"workdir {workdir}: its lock {path / LOCK_FILE} is a directory; remove it or {fix}"
    return f"workdir {workdir} cannot be used ({error.strerror or type(error).__name__}); {fix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def acquire(workdir: str | os.PathLike) -> pathlib.Path:
    """Takes the lock of ``workdir`` (created if needed); returns the lock path."""
    path = pathlib.Path(workdir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(workdir_problem(workdir, e)) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if path.is_dir():
                raise WorkdirError(workdir_problem(workdir, IsADirectoryError(errno.EISDIR, "Is a directory"))) from None
            holder = _read(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                logger.warning("workdir %s: taking over the stale lock of pid %d (no longer running)", workdir, pid)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not holder:  # being written right now, or unreadable
                time.sleep(0.2)
                holder = _read(path)
                if not holder:
                    raise WorkdirBusyError(f"workdir {workdir} is locked ({path} is unreadable); if no run uses it, "
                                           f"delete {path}")
            where = "this host" if host == me["host"] else f"host {host}"
            raise WorkdirBusyError(
                f"workdir {workdir} is in use by pid {pid} on {where} (since {holder.get('started', '?')}); wait for "
                f"that run or use another --workdir" + ("" if host == me["host"] else f"; if it is gone, delete {path}"))
        except OSError as e:  # read-only file system, no permission, no space
            raise WorkdirError(workdir_problem(workdir, e)) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            raise WorkdirError(workdir_problem(workdir, e)) from None
        return path
    raise WorkdirBusyError(f"workdir {workdir}: could not take the lock {path}")


def release(path: pathlib.Path) -> None:
    """Removes the lock if this process holds it."""
    if _read(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, enabled: bool = True):
    """``with hold(workdir):`` the run's body (``enabled=False``: no lock, e.g. on processes > 0)."""
    if not enabled:
        yield None
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
