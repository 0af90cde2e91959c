"""A checkpoint save that runs out of disk: one clear error, no partial files, the last one intact.

Runs on a real full filesystem: a small tmpfs mounted by the test (skipped where mounting is
not allowed)."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bioscan_jax import checkpoint as checkpoint_lib
from bioscan_jax.checkpoint import Checkpointer, DiskFullError
from conftest import mounted_tmpfs

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path, "size=2m") as mount_point:
        yield mount_point


def fill(disk, leave: int):
    """Writes a file that leaves ``leave`` bytes free on ``disk``."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_disk_full_save_is_one_error_and_leaves_the_previous_checkpoint(small_disk, caplog, async_save):
    directory = small_disk / "checkpoints"
    small = {"w": np.arange(1000, dtype=np.float32)}
    big = {"w": np.random.default_rng(0).random(300_000).astype(np.float32)}  # 1.2 MB, incompressible
    with caplog.at_level(logging.INFO):
        ckpt = Checkpointer(directory, keep=3, async_save=async_save)
        ckpt.save(1, small)
        ckpt.wait()
        fill(small_disk, leave=200_000)
        with pytest.raises(DiskFullError) as e:
            ckpt.save(2, big)
            ckpt.wait()
        ckpt.close()
    message = str(e.value)
    assert "\n" not in message and e.value.errno == 28
    assert f"no space left on the device of {directory} while saving checkpoint 2" in message
    assert "it needs about 1.1 MB" in message and "checkpoint 1 is intact" in message
    assert sorted(os.listdir(directory)) == ["1"]  # no partial *-tmp directory
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage()[:200] for r in tracebacks]
    os.remove(small_disk / "filler")
    import jax

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), small)
    restored, step = Checkpointer(directory).restore(abstract)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["w"]), small["w"])


def test_disk_full_is_recognised_through_tensorstore_messages():
    wrapped = ValueError("RESOURCE_EXHAUSTED: Error writing ... No space left on device [os_error_code='28']")
    assert checkpoint_lib.is_disk_full(wrapped)
    try:
        try:
            raise OSError(28, "No space")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert checkpoint_lib.is_disk_full(outer)
    assert not checkpoint_lib.is_disk_full(ValueError("shape mismatch"))


_SAVE_ON_A_FULL_DISK = """
import os, sys
import numpy as np
from bioscan_jax.checkpoint import Checkpointer, DiskFullError

# A train state of many arrays: tensorstore has writes in flight when the first one fails.
state = {f"w{i}": np.random.default_rng(i).random(8000).astype(np.float32) for i in range(200)}
try:
    with Checkpointer(os.path.join(sys.argv[1], "checkpoints"), keep=2, async_save=True) as ckpt:
        ckpt.save(2, state)
        ckpt.wait()
except DiskFullError as e:
    sys.exit(f"run.py: {e}")  # as run.py reports it
"""


def test_disk_full_in_a_process_prints_one_line_and_no_traceback_from_orbax_or_asyncio(small_disk):
    """The real thing, in its own process: an asynchronous save of a many-array state on a full
    disk. orbax's event loop closes under tensorstore's pending write callbacks, whose
    ``RuntimeError: Event loop is closed`` used to be printed dozens of times around the line."""
    out = subprocess.run([sys.executable, "-c", _SAVE_ON_A_FULL_DISK, str(small_disk)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(
        f"run.py: no space left on the device of {small_disk / 'checkpoints'} while saving checkpoint 2"), lines[:5]


def test_only_the_aftermath_of_a_disk_full_save_is_silenced():
    """The hook holds back asyncio's closed-loop callback errors until it knows whether a disk-full
    save explains them; anything else, and those same errors without a disk-full, are reported."""
    import types

    def unraisable(error):
        try:
            raise error
        except RuntimeError as e:
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    def closed_loop():
        import asyncio

        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print)
        except RuntimeError as e:
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    seen = []
    hook = checkpoint_lib._DiskFullAftermath()
    hook._previous = seen.append
    other = unraisable(RuntimeError("something else"))
    hook(other)
    assert seen == [other]  # not ours: reported at once
    late = closed_loop()
    hook(late)
    assert seen == [other]  # held until we know
    hook.settle(saved=True)
    assert seen == [other, late]  # no disk-full: reported after all
    hook(closed_loop())
    hook.disk_full()
    hook(closed_loop())
    hook.settle()
    assert seen == [other, late]  # the aftermath of a disk-full save: dropped
