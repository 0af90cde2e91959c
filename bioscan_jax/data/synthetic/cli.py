"""Command line of the synthetic BIOSCAN-5M generator (``python -m bioscan_jax.data.synthetic``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from bioscan_jax.data import schema
from bioscan_jax.data.synthetic.layout import generate
from bioscan_jax.data.synthetic.specimens import DEFAULT_NUM_RECORDS

def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m bioscan_jax.data.synthetic --out DIR [--records N] [--seed S] [--no-images]``."""
    parser = argparse.ArgumentParser(description="Write a synthetic BIOSCAN-5M dataset in the official layout.")
    parser.add_argument("--out", required=True, help="output folder (bioscan5m/ is created inside)")
    parser.add_argument("--records", type=int, default=None,
                        help=f"number of records (default {DEFAULT_NUM_RECORDS}; with --fast {schema.OFFICIAL_NUM_RECORDS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--package", default=schema.DEFAULT_IMAGE_PACKAGE, choices=schema.IMAGE_PACKAGES)
    parser.add_argument("--no-images", action="store_true", help="write the metadata CSV only")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPUs, max 8)")
    parser.add_argument("--fast", action="store_true",
                        help="the metadata CSV only, at BIOSCAN-5M's size and proportions by default, vectorised "
                             "(bioscan_jax.data.synthetic.bulk; --records scales it)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.fast:
        from bioscan_jax.data.synthetic import bulk

        records = schema.OFFICIAL_NUM_RECORDS if args.records is None else args.records
        try:
            spec = bulk.plan(records, seed=args.seed)
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: {e}\n")
        path = bulk.write_metadata(args.out, spec)
        print(f"wrote {records} records ({spec.unique_barcodes} distinct barcodes) to {path} in "
              f"{time.perf_counter() - start:.1f} s")
        return 0
    args.records = DEFAULT_NUM_RECORDS if args.records is None else args.records
    path = generate(
        args.out,
        num_records=args.records,
        seed=args.seed,
        image_package=args.package,
        images=not args.no_images,
        workers=args.workers,
    )
    print(f"wrote {args.records} records to {path} in {time.perf_counter() - start:.1f} s")
    return 0
