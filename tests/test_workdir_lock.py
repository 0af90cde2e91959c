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
from conftest import mounted_tmpfs

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


# ----------------------------------------------------------------------------- unusable workdirs


@pytest.mark.parametrize("where, message", [
    ("file", "workdir {w} is a file, not a directory; use another --workdir"),
    ("file/sub", "workdir {w}: {f} is a file, not a directory; use another --workdir"),
], ids=["workdir-is-a-file", "parent-is-a-file"])
def test_run_py_names_a_workdir_that_is_a_file_in_one_line_before_any_data(tmp_path, where, message):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / where
    out = subprocess.run([sys.executable, "run.py", "--config=configs/barcodebert.py", f"--workdir={workdir}",
                          f"--config.data.data_dir={tmp_path / 'tfds'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "run.py: " + message.format(w=workdir, f=tmp_path / "file")
    assert not (tmp_path / "tfds").exists()  # refused before any data was built


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ``ro``; as root, chmod does not stop writes)."""
    with mounted_tmpfs(tmp_path, "ro,size=1m") as mount_point:
        yield mount_point


@pytest.mark.parametrize("sub", ["", "new"], ids=["existing", "to-create"])
def test_read_only_workdir_is_one_line(read_only_dir, sub):
    workdir = read_only_dir / sub if sub else read_only_dir
    with pytest.raises(workdir_lock.WorkdirError) as e:
        workdir_lock.acquire(workdir)
    assert str(e.value) == f"workdir {workdir} is not writable (read-only file system); use another --workdir"


def test_workdir_problem_turns_each_os_error_into_one_line(tmp_path):
    import errno

    w = tmp_path / "w"
    problem = workdir_lock.workdir_problem
    assert problem(w, OSError(errno.EROFS, "Read-only file system")) == \
        f"workdir {w} is not writable (read-only file system); use another --workdir"
    assert problem(w, PermissionError(errno.EACCES, "Permission denied")).startswith(
        f"workdir {w} is not writable (permission denied)")
    assert "no space left" in problem(w, OSError(errno.ENOSPC, "No space left on device"))
    assert problem(w, OSError(errno.EIO, "Input/output error")) == \
        f"workdir {w} cannot be used (Input/output error); use another --workdir"
    (tmp_path / "f").write_text("")
    assert problem(tmp_path / "f", FileExistsError(errno.EEXIST, "File exists")) == \
        f"workdir {tmp_path / 'f'} is a file, not a directory; use another --workdir"
    (w / workdir_lock.LOCK_FILE).mkdir(parents=True)  # a directory where the lock file goes
    with pytest.raises(workdir_lock.WorkdirError, match="is a directory"):
        workdir_lock.acquire(w)
