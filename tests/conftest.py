"""Shared test fixtures."""

import contextlib
import os
import pathlib
import subprocess
import uuid

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# run.py and the CLI turn on JAX's persistent compilation cache (bioscan_jax/compilation_cache.py);
# the tests' subprocesses compile afresh and write nothing under ~/.cache.
os.environ.setdefault("BIOSCAN_JAX_COMPILATION_CACHE", "off")
REAL_BARCODES = REPO_ROOT.parent / "shared" / "data" / "real_barcodes" / "canadian_invertebrates_100sp.tsv"


@pytest.fixture(scope="session")
def real_barcodes_path() -> pathlib.Path:
    """The 5,000 real BOLD barcodes beside the project; skips when they are absent."""
    if not REAL_BARCODES.exists():
        pytest.skip(f"real barcodes not found at {REAL_BARCODES} (they live in ../shared/data/real_barcodes/)")
    return REAL_BARCODES


@contextlib.contextmanager
def mounted_tmpfs(parent: pathlib.Path, options: str):
    """A real tmpfs mounted under ``parent`` with ``options`` (e.g. ``ro,size=1m``), unmounted
    after; skips where mounting is not allowed (not root, no mount namespace)."""
    mount_point = parent / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


#: Fixtures that train and evaluate a whole task, or run a multi-process or kill-and-resume job,
#: end to end: every test that uses one is marked ``slow``. ``pytest -m "not slow"`` is the fast
#: developer tier; ``bash .ci/run`` runs everything.
END_TO_END_FIXTURES = frozenset({
    "run_result",      # test_barcodebert_task: the BarcodeBERT main job on a small dataset
    "best_val_run",    # test_evaluators: fine-tuning with validation and best-val selection
    "tiny_run",        # test_clibd: the CLIBD task
    "first_run",       # test_zsc: the ZSC task
    "plans",           # test_plan: the planner compiling every paper config on 8 fake devices
    "runs",            # test_multiprocess: 1 x 8 vs 2 x 4 processes
    "pristine",        # test_resume: a full run to compare resumed runs against
    "uninterrupted",   # test_resume: the same, for the signal tests
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
