"""Shared test fixtures."""

import os
import pathlib

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
