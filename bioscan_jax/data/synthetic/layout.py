"""Files of the synthetic BIOSCAN-5M: images drawn in a worker pool, and the metadata CSV.

:func:`generate` simulates the metadata (:func:`~bioscan_jax.data.synthetic.specimens.simulate`),
draws and writes every record's picture (:mod:`~bioscan_jax.data.synthetic.images`), fills the
image size columns and writes the CSV, in the official on-disk layout.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pathlib
import sys
import threading
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bioscan_jax.data import schema
from bioscan_jax.data.synthetic import images as images_lib
from bioscan_jax.data.synthetic.specimens import DEFAULT_NUM_RECORDS, Simulation, simulate, stream


#: Libraries that start native threads: a process that imported one is not forked.
_THREADED_LIBRARIES = ("jax", "tensorflow", "torch")


def _pool_context() -> multiprocessing.context.BaseContext:
    """'fork' when it is safe (no threads in this process), else 'spawn'.

    Forking needs no ``if __name__ == "__main__"`` guard in the calling script; spawning is
    the safe choice once a threaded runtime such as JAX is loaded (such programs have the guard).
    """
    threaded = threading.active_count() > 1 or any(name in sys.modules for name in _THREADED_LIBRARIES)
    if "fork" in multiprocessing.get_all_start_methods() and not threaded:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_jobs(jobs: list[images_lib.SpecimenJob], workers: int) -> list[images_lib.SpecimenSize]:
    """Runs specimen jobs in order, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(jobs) < 4 * workers:
        return [images_lib.process_job(j) for j in jobs]
    chunksize = max(8, min(256, len(jobs) // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        return list(pool.map(images_lib.process_job, jobs, chunksize=chunksize))


def specimen_jobs(sim: Simulation, seed: int, paths: Sequence[str] | None = None) -> list[images_lib.SpecimenJob]:
    """The drawing job of every row (``paths``: where to write each JPEG; None measures only)."""
    traits = sim.traits.tolist()
    return [
        images_lib.SpecimenJob(seed, i, sim.body_plans[i], tuple(traits[i]), None if paths is None else paths[i])
        for i in range(len(sim.metadata))
    ]


def add_image_sizes(sim: Simulation, seed: int, paths: Sequence[str] | None, workers: int) -> None:
    """Measures (and when ``paths`` is given, draws and writes) every record's specimen, then
    fills image_measurement_value, area_fraction and scale_factor."""
    sizes = _run_jobs(specimen_jobs(sim, seed, paths), workers)
    df = sim.metadata
    pixels = np.array([s.pixel_count for s in sizes], dtype=np.float64)
    pixels[stream(seed, 8).random(len(pixels)) < 0.03] = np.nan
    df["image_measurement_value"] = pixels
    df["area_fraction"] = [s.area_fraction for s in sizes]
    df["scale_factor"] = [s.scale_factor for s in sizes]


def default_workers() -> int:
    """Worker processes for drawing: the usable CPUs, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def write_metadata(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Writes the metadata CSV in the official column order; missing values are empty cells.

    The file appears at once (written beside it, then renamed).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    df.to_csv(partial, index=False, columns=list(schema.COLUMNS), na_rep="", lineterminator="\n")
    os.replace(partial, path)


def generate(
    out_dir: str | os.PathLike,
    *,
    num_records: int = DEFAULT_NUM_RECORDS,
    seed: int = 0,
    image_package: str = schema.DEFAULT_IMAGE_PACKAGE,
    images: bool = True,
    workers: int | None = None,
) -> pathlib.Path:
    """Writes a synthetic BIOSCAN-5M under ``out_dir``; returns the metadata CSV path.

    ``images=False`` writes the metadata only (the CSV is byte-identical either way).
    ``workers`` sets the drawing processes (default: usable CPUs, at most 8); it does not change
    the output. Pools fork, or spawn once JAX, TensorFlow or PyTorch is imported: a script that
    imports those and then calls this needs the usual ``if __name__ == "__main__":`` guard.
    Existing files are overwritten, others left alone; the CSV is written last (atomically), so
    its presence means the dataset is complete.
    """
    out = pathlib.Path(out_dir)
    if image_package not in schema.IMAGE_PACKAGES:
        raise ValueError(f"Unknown image package {image_package!r}; valid: {', '.join(schema.IMAGE_PACKAGES)}")
    sim = simulate(num_records, seed)
    df = sim.metadata
    paths = None
    if images:
        chunks = df["chunk"].fillna("").tolist()
        paths = [
            str(out / schema.image_relpath(image_package, s, c, p))
            for s, c, p in zip(df["split"].tolist(), chunks, df["processid"].tolist(), strict=True)
        ]
    add_image_sizes(sim, seed, paths, default_workers() if workers is None else workers)
    csv_path = out / schema.METADATA_RELPATH
    write_metadata(df, csv_path)
    return csv_path
