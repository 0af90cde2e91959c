"""Checkpoints: the train state and the input-pipeline position, with orbax.

One :class:`Checkpointer` per run directory. Each checkpoint ``<directory>/<step>/`` holds

* ``state``: the train state (params, optimizer state, step, model RNG state) via
  ``ocp.args.StandardSave`` / ``StandardRestore`` (restored straight into the shardings of the
  abstract target, which must carry concrete ``NamedSharding``s — :class:`TrainSetup` provides
  them);
* ``data``: the grain iterator state (``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``,
  one JSON file per process), when an iterator is given.

Saving is asynchronous by default (arrays are copied off the devices before ``save`` returns,
the files are written in the background; orbax renames the step directory into place only when
complete, so a killed run never leaves a half-written ``<step>/``). The last ``keep`` checkpoints
are kept.

Resume is robust to damaged checkpoints: :meth:`Checkpointer.restore` tries the newest step first;
if it fails to restore (files truncated or missing), it warns and falls back to the previous one.
Once an older step restores, the newer damaged step directories are moved to
``<directory>.corrupt/<step>-<time>`` (kept for inspection; out of the way of the steps that will
be saved again). When no checkpoint restores, nothing is moved and an error is raised.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import shutil
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

import grain
import grain.checkpoint  # noqa: F401  (registers the grain handlers with orbax)

logger = logging.getLogger(__name__)


class NoUsableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them could be restored."""


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space (its partial files were removed)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is ENOSPC; tensorstore reports it inside a
    ``ValueError('RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']')``."""
    seen = 0
    while error is not None and seen < 16:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


class _DropDiskFullRecords(logging.Filter):
    """orbax logs a disk-full save failure as several tracebacks from its background threads;
    :class:`Checkpointer` reports it once, as a :class:`DiskFullError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() if record.args else str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            full = is_disk_full(record.exc_info[1])
        else:
            full = "No space left on device" in text
        if full:
            _AFTERMATH.disk_full()
        return not full


_DISK_FULL_FILTER = _DropDiskFullRecords()


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable exception is asyncio's ``RuntimeError('Event loop is closed')``
    raised in ``loop.call_soon_threadsafe``: what tensorstore's write callbacks hit, from its own
    threads, when orbax's save coroutine has already failed and its event loop is closed."""
    error = getattr(unraisable, "exc_value", None)
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    tb = getattr(unraisable, "exc_traceback", None)
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


class _DiskFullAftermath:
    """A ``sys.unraisablehook`` that silences the aftermath of a disk-full save, and nothing else.

    When a save runs out of space, orbax's save coroutine fails and its event loop closes while
    tensorstore still has writes in flight; each of their completion callbacks then calls
    ``loop.call_soon_threadsafe`` on the closed loop, and the ``RuntimeError('Event loop is
    closed')`` is printed as an unraisable exception -- dozens of tracebacks around the one line
    of :class:`DiskFullError`. Those exceptions are held back here (they cannot say which save
    they belong to, and they may come before the failure is known); they are dropped once a
    disk-full failure is seen, and passed on to the previous hook otherwise (at the next
    successful :meth:`Checkpointer.wait` and at exit). Every other unraisable exception goes
    straight to the previous hook.
    """

    MAX_HELD = 10_000

    def __init__(self):
        self._lock = threading.Lock()
        self._held: list = []
        self._disk_full = False
        self._previous = None
        self._at_exit = False

    def install(self) -> None:
        """Makes this the process's unraisable hook (again, if something replaced it since)."""
        with self._lock:
            if sys.unraisablehook is self:
                return
            self._previous = sys.unraisablehook
            sys.unraisablehook = self
            first, self._at_exit = not self._at_exit, True
        if first:
            atexit.register(self.settle)

    def __call__(self, unraisable) -> None:
        if _is_closed_loop_callback(unraisable):
            with self._lock:
                if self._disk_full:
                    return
                if len(self._held) < self.MAX_HELD:
                    self._held.append(unraisable)
                    return
        (self._previous or sys.__unraisablehook__)(unraisable)

    def disk_full(self) -> None:
        """A save ran out of space: what it left behind (held or still to come) is dropped."""
        with self._lock:
            self._disk_full = True
            self._held.clear()

    def settle(self, *, saved: bool = False) -> None:
        """Passes the held exceptions on unless a disk-full failure explains them; ``saved``
        (a save completed since): later ones are held again, not dropped."""
        with self._lock:
            held, self._held = ([] if self._disk_full else self._held), []
            if saved:
                self._disk_full = False
        for unraisable in held:
            (self._previous or sys.__unraisablehook__)(unraisable)


_AFTERMATH = _DiskFullAftermath()


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


class _IteratorSnapshot:
    """The iterator's state captured when ``save`` is called, for the asynchronous writer.

    grain's handler asks ``item.get_state()`` (bytes for a ``DataLoaderIterator``, a dict for a
    ``DatasetIterator``) — possibly after training went on; a snapshot pins the saved position.
    Written as JSON either way, which is what the restore side of the handler reads.
    """

    def __init__(self, iterator: Any):
        state = iterator.get_state()
        if isinstance(state, (bytes, bytearray)):
            self._state = bytes(state)
        else:
            self._state = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _unwrap_iterator(iterator: Any) -> Any:
    """Follow ``.checkpointable`` (wrappers in the loop) down to the grain iterator."""
    while hasattr(iterator, "checkpointable"):
        iterator = iterator.checkpointable
    return iterator


class Checkpointer:
    """Save / restore ``(train state, data iterator)`` every N steps, keeping the last K."""

    STATE = "state"
    DATA = "data"

    def __init__(self, directory: str | epath.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        self.keep = keep
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(self.STATE, self.DATA))
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
        absl_logger = logging.getLogger("absl")
        if _DISK_FULL_FILTER not in absl_logger.filters:
            absl_logger.addFilter(_DISK_FULL_FILTER)
        _AFTERMATH.install()

    # -- queries ----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- save -------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_iter: Any = None) -> bool:
        """Save ``state`` (and the iterator position) as checkpoint ``step``.

        Returns False when a checkpoint for ``step`` already exists (nothing written).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        items = {self.STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[self.DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(_unwrap_iterator(data_iter)))
        nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))
        self.wait()  # orbax would finish the previous save first anyway: report its failure as its own
        self._pending = (step, nbytes)
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:  # noqa: BLE001 - re-raised unless disk full
            self._raise_if_disk_full(e)
            raise

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk.

        Raises :class:`DiskFullError` (one line: the path, the space needed and free) when a save
        ran out of space; its partial ``*.orbax-checkpoint-tmp*`` files are removed first, and the
        earlier checkpoints are untouched.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised unless disk full
            self._raise_if_disk_full(e)
            raise
        if self._pending is not None:
            _AFTERMATH.settle(saved=True)
        self._pending = None

    def _raise_if_disk_full(self, error: BaseException) -> None:
        if not is_disk_full(error):
            return
        _AFTERMATH.disk_full()
        step, nbytes = self._pending or (None, 0)
        self._pending = None
        if jax.process_index() == 0:
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(str(partial), ignore_errors=True)
        complete = complete_steps(self.directory)
        free = shutil.disk_usage(str(self.directory)).free
        kept = (f"checkpoint {complete[-1]} is intact" if complete else "no earlier checkpoint exists")
        raise DiskFullError(
            f"no space left on the device of {self.directory} while saving checkpoint {step}: it needs "
            f"about {_mb(nbytes)}, {_mb(free)} free; {kept}. Free some space (or use another --workdir) "
            f"and run again to resume") from None

    # -- restore ----------------------------------------------------------------------------

    def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        items = {self.STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / self.DATA).exists()
        if data_iter is not None:
            if not has_data:
                raise FileNotFoundError(f"checkpoint {step} has no data-iterator state")
            items[self.DATA] = grain.checkpoint.CheckpointRestore(_unwrap_iterator(data_iter))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[self.STATE]

    def _quarantine(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        if not src.exists():
            return
        dst_root = epath.Path(str(self.directory) + ".corrupt")
        dst_root.mkdir(parents=True, exist_ok=True)
        dst = dst_root / f"{step}-{int(time.time())}"
        try:
            src.rename(dst)
        except OSError:
            shutil.rmtree(str(src), ignore_errors=True)

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> tuple[Any, int]:
        """Restore the newest usable checkpoint (or exactly ``step``): ``(state, step)``.

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with concrete shardings (the
        restore target); ``data_iter`` (optional) is set to the saved position in place.
        Damaged checkpoints are skipped with a warning (see the module docstring). Raises
        ``FileNotFoundError`` when there is no checkpoint and :class:`NoUsableCheckpointError`
        when none can be restored (e.g. the model changed since they were written).
        """
        self._manager.reload()
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors, failed = [], []
        for s in steps:
            try:
                state = self._restore_step(s, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                errors.append(f"step {s}: {msg}")
                failed.append(s)
                logger.warning(
                    "checkpoint %s/%d cannot be restored (%s); skipping it and falling back to an "
                    "earlier checkpoint", self.directory, s, msg)
                continue
            if failed and step is None:
                # Newer damaged steps would block saving those steps again: move them aside.
                for bad in failed:
                    self._quarantine(bad)
                if jax.process_count() > 1:
                    ocp.multihost.sync_global_processes("bioscan_jax_checkpoint_quarantine")
                self._manager.reload()
            return state, int(s)
        raise NoUsableCheckpointError(
            f"none of the checkpoints in {self.directory} could be restored ({'; '.join(errors)}). "
            f"If the model or optimizer configuration changed, use a new workdir; otherwise delete "
            f"the damaged checkpoints to start afresh")

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.wait_until_finished()
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - a disk-full save is reported by save()/wait()
            if not is_disk_full(e):
                raise
            _AFTERMATH.disk_full()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- parameters only ----------------------------------------------------------------------------


def complete_steps(checkpoint_dir: str | epath.PathLike) -> list[int]:
    """The complete checkpoint steps in ``checkpoint_dir``, ascending (orbax renames a step's
    directory to its number only when it is whole); ``[]`` when there is no such directory."""
    directory = epath.Path(checkpoint_dir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def latest_step(checkpoint_dir: str | epath.PathLike) -> int:
    """The newest complete checkpoint step in ``checkpoint_dir`` (``FileNotFoundError`` if none)."""
    steps = complete_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    return steps[-1]


def restore_params(checkpoint_dir: str | epath.PathLike, step: int | None = None) -> dict[str, Any]:
    """The parameters (pure dict, host numpy) of a train-loop checkpoint directory
    (``<checkpoint_dir>/<step>/state``, newest step by default): the one way a trained model is
    read back for evaluation, conversion or as another run's initialisation.

    The restore target is built from the checkpoint's own metadata (on one device), so neither
    the optimizer nor the mesh of the run that wrote it needs to be known.
    """
    directory = epath.Path(checkpoint_dir).absolute()
    step = latest_step(directory) if step is None else int(step)
    path = directory / str(step) / Checkpointer.STATE
    if not path.is_dir():
        raise FileNotFoundError(f"no train state at {path}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def is_leaf(x):
        return hasattr(x, "shape") and hasattr(x, "dtype")

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))  # orbax's routine INFO lines
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                                    tree["params"], is_leaf=is_leaf)
            restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), abstract)
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True))
    finally:
        absl_logger.setLevel(level)
    return jax.device_get(restored["params"])

