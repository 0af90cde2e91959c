"""Data benchmarks: TFDS build throughput and memory, grain pipeline throughput.

Prints one JSON line per measurement:

* ``build``: records/s of building the ``dna`` and ``cropped_256`` configs from a
  synthetic BIOSCAN-5M of ``--records`` records (generated once, in the official
  layout, images included), each build in a fresh subprocess, with its peak RSS and
  RSS samples over the build (memory stays flat: images are streamed; only the
  metadata frame and TFDS's bounded (1 GiB) shuffle buffer are held). ``cropped_256``
  is built with the builder's image verification (every JPEG decoded,
  ``verify_images=True``, the default) and without it (structural check only), into
  separate data dirs;
* ``build_image_verification``: the ``cropped_256`` rates with and without verification,
  built alternately ``--build-rounds`` times, and the median, min and max of the per-pair
  ratio ``verified_over_unverified`` (the decodes run in checking processes beside the
  writer, so on two or more cores verification costs little wall time);
* ``pipeline``: samples/s of the DNA MLM pipeline (batched tokenisation, and the
  per-record alternative for comparison) and of the training image pipeline at 224 px,
  for each ``--workers`` count.

    python benchmarks/data_benchmark.py                     # small, a few minutes
    python benchmarks/data_benchmark.py --records 100000    # the memory check
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), _rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), _rss_mb()))


def _cpu_model() -> str:
    """The machine line: CPU model and core count."""
    import platform

    from bioscan_jax import xla_cpu

    model = xla_cpu.cpu_model() or platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def _check_workers() -> int:
    from tfds_builder.bioscan5m import jpeg_check

    return jpeg_check.default_worker_count()


def build_child(config: str, data_dir: str, manual_dir: str, verify_images: bool = True) -> None:
    """(Subprocess) builds one config and reports time and memory."""
    import resource

    import tensorflow_datasets as tfds

    from bioscan_jax.data import tfds_source

    tfds.disable_progress_bar()
    start_rss = _rss_mb()
    started = time.time()
    with RssSampler() as sampler:
        b = tfds_source.prepare(config, data_dir, manual_dir, verify_md5=False, verify_images=verify_images)
    seconds = time.time() - started
    n = b.info.splits.total_num_examples
    import numpy as np

    rss = np.array([r for _, r in sampler.samples])
    tenths = [round(float(part.max())) for part in np.array_split(rss, min(10, len(rss)))]
    emit(
        benchmark="build",
        config=config,
        verify_images=verify_images,
        image_check=b.info.metadata.get("image_check"),
        records=n,
        seconds=round(seconds, 2),
        records_per_s=round(n / seconds, 1),
        bytes_written=int(b.info.dataset_size),
        rss_start_mb=round(start_rss),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        rss_by_tenth_of_build_mb=tenths,
        tensorflow_loaded="tensorflow" in sys.modules,
    )


def _time_pipeline(make, *, batch_size: int, seconds: float, warmup: int = 2) -> tuple[float, int]:
    it = iter(make())
    for _ in range(warmup):
        next(it)
    n, start = 0, time.time()
    while time.time() - start < seconds:
        next(it)
        n += 1
    return n * batch_size / (time.time() - start), n


def pipelines(data_dir: str, args) -> None:
    import grain

    from bioscan_jax.data import dna, pipeline, tfds_source

    tok = dna.KmerTokenizer(args.k)
    dna_src = tfds_source.data_source("bioscan5m/dna", "all", data_dir)
    img_src = tfds_source.data_source("bioscan5m/cropped_256", "all", data_dir)

    class PerRecordTokens(grain.transforms.RandomMap):
        """The alternative: tokenise each record, then stack (for comparison only)."""

        def random_map(self, rec, rng):
            ids, mask = tok([rec["dna_barcode"]], offsets=dna.random_offsets(rng, 1, tok.k))
            masked, where = tok.mask_tokens(ids, rng, 0.5, attention_mask=mask)
            return {"ids": masked[0], "attention_mask": mask[0], "targets": tok.mlm_targets(ids)[0], "mlm_mask": where[0]}

    def per_record(workers):
        ds = pipeline.records_pipeline(dna_src, train=True, seed=0, shard=None)
        ds = ds.random_map(PerRecordTokens()).batch(args.dna_batch, drop_remainder=True)
        return pipeline._finish(ds, worker_count=workers, read_threads=None, prefetch=None)  # pylint: disable=protected-access

    for workers in args.workers:
        cases = {
            "dna_mlm_batched_tokenisation": (
                lambda w=workers: pipeline.dna_pipeline(
                    dna_src, tokenizer=tok, batch_size=args.dna_batch, train=True, mlm=True,
                    label_rank="species", shard=None, worker_count=w),
                args.dna_batch,
            ),
            "dna_mlm_per_record_tokenisation": (lambda w=workers: per_record(w), args.dna_batch),
            "image_train_224": (
                lambda w=workers: pipeline.image_pipeline(
                    img_src, batch_size=args.image_batch, train=True, label_rank="species", shard=None, worker_count=w),
                args.image_batch,
            ),
        }
        for name, (make, batch) in cases.items():
            rate, batches = _time_pipeline(make, batch_size=batch, seconds=args.seconds)
            emit(benchmark="pipeline", pipeline=name, worker_count=workers, batch_size=batch,
                 samples_per_s=round(rate, 1), batches_timed=batches, k=args.k if "dna" in name else None,
                 cpus=os.cpu_count())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="synthetic records to generate and build")
    parser.add_argument("--workdir", default=None, help="where to generate and build (default: a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="pipeline worker counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per pipeline measurement")
    parser.add_argument("--dna-batch", type=int, default=256)
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="k-mer length of the DNA tokenizer")
    parser.add_argument("--skip-build", action="store_true", help="reuse the builds in --workdir")
    parser.add_argument("--build-rounds", type=int, default=3,
                        help="verified/unverified cropped_256 build pairs, alternated")
    parser.add_argument("--_build", nargs=3, metavar=("CONFIG", "DATA_DIR", "MANUAL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--_no-verify-images", dest="_no_verify_images", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._build:
        build_child(*args._build, verify_images=not args._no_verify_images)
        return 0

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bioscan_data_bench_"))
    src, data_dir = workdir / "source", workdir / "tfds"
    if not args.skip_build:
        from bioscan_jax.data import synthetic

        started = time.time()
        if not (src / "bioscan5m").exists():
            synthetic.generate(src, num_records=args.records, seed=0)
        emit(benchmark="synthetic_generate", records=args.records, seconds=round(time.time() - started, 1))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))

        def build(config, out_dir, verify):
            cmd = [sys.executable, __file__, "--_build", config, str(out_dir), str(src)]
            proc = subprocess.run(cmd + ([] if verify else ["--_no-verify-images"]), check=True, env=env,
                                  stdout=subprocess.PIPE, text=True)
            sys.stdout.write(proc.stdout)
            sys.stdout.flush()
            lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            return next(r for r in lines if r.get("benchmark") == "build")

        build("dna", data_dir, True)
        # cropped_256 with and without image verification, alternated (a pair per round, each
        # build into a fresh data dir: a prepared dataset is never rebuilt); the pipelines read
        # the first verified one.
        pairs = []
        for n in range(args.build_rounds):
            verified = build("cropped_256", data_dir if n == 0 else workdir / f"tfds_verified_{n}", True)
            unverified = build("cropped_256", workdir / f"tfds_unverified_{n}", False)
            pairs.append((verified["records_per_s"], unverified["records_per_s"]))
        import numpy as np

        ratios = [v / u for v, u in pairs]
        emit(benchmark="build_image_verification", config="cropped_256", records=args.records,
             rounds=len(pairs), verified_records_per_s=[v for v, _ in pairs], unverified_records_per_s=[u for _, u in pairs],
             verified_over_unverified_median=round(float(np.median(ratios)), 3),
             verified_over_unverified_min=round(min(ratios), 3), verified_over_unverified_max=round(max(ratios), 3),
             image_check_workers=_check_workers(), cpu=_cpu_model())
    pipelines(str(data_dir), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
