"""A checkpoint save that runs out of disk: one clear error, no partial files, the last one intact.

Runs on a real full filesystem: a small tmpfs mounted by the test (skipped where mounting is
not allowed)."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid

import numpy as np
import pytest

from bioscan_jax import checkpoint as checkpoint_lib
from bioscan_jax.checkpoint import Checkpointer, DiskFullError


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


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
    assert checkpoint_lib._is_disk_full(wrapped)
    try:
        try:
            raise OSError(28, "No space")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert checkpoint_lib._is_disk_full(outer)
    assert not checkpoint_lib._is_disk_full(ValueError("shape mismatch"))
