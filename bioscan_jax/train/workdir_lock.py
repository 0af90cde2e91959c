"""One writer per workdir: a lock file holding the pid, host and start time of the run that owns it.

:func:`hold` creates ``<workdir>/.lock`` atomically (``O_CREAT | O_EXCL``). A second run on the
same workdir fails at once with :class:`WorkdirBusyError`, naming the holder. A lock whose pid is
dead on this host is stale (a killed run): it is taken over with a warning. A lock held from
another host is never taken over (its pid cannot be checked from here); the message says how to
remove it. The lock is removed when the run ends, also on an exception.
"""

from __future__ import annotations

import contextlib
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
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
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
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
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
