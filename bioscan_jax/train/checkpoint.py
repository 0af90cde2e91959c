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

import json
import logging
import shutil
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
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

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
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
