"""One writer per workdir: real processes hold, refuse and leave stale locks."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from bioscan_jax.train import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time; from bioscan_jax.train import workdir_lock as w; "
          "p = w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)")


def _holder(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=f"in use by pid {proc.pid} on this host"):
            workdir_lock.acquire(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9 leaves the lock file behind: it is stale now and taken over with a warning
    assert (tmp_path / workdir_lock.LOCK_FILE).exists()
    with workdir_lock.hold(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock of pid" in caplog.text
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # released at the end


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(workdir_lock.WorkdirBusyError, match="host elsewhere.*delete"):
        workdir_lock.acquire(tmp_path)


def test_run_py_exits_at_once_when_the_workdir_is_in_use(tmp_path):
    proc = _holder(tmp_path / "work")
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "run.py", "--config=configs/barcodebert.py",
                              f"--workdir={tmp_path / 'work'}", f"--config.data.data_dir={tmp_path / 'tfds'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert out.returncode != 0 and seconds < 60
    assert f"in use by pid {proc.pid}" in out.stderr
    assert not (tmp_path / "tfds").exists()  # refused before any data was built
