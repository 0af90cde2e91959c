"""Throughput of ``bioscan-jax identify --images``: images per second and peak RSS, for the tiny
CLIBD towers (``configs/clibd.py``, 64 px ViT) and the paper-size towers (``configs/clibd.py:paper``:
ViT-B/16 at 224 px, BarcodeBERT 5-12-12), both randomly initialised (the speed does not depend on
the weights; no download is needed).

  python benchmarks/identify_images_benchmark.py                      # both, about 3 minutes on 2 cores
  python benchmarks/identify_images_benchmark.py --towers paper --images 256 --references 500

Each tower size runs in its own process (its own peak RSS): the towers are saved as a CLIBD run
directory, ``index --images`` embeds a labelled DNA reference of random barcodes once, then
``identify --images --reference INDEX`` identifies N photos (1024 x 768 JPEGs, the size of
BIOSCAN-5M's original images) end to end: model loading and compilation included
(``images_per_s``); a second ``identify`` of ``--warm-up`` images gives the fixed cost, and
``marginal_images_per_s`` is the rate without it. The compilation cache is off. One JSON line
per measurement, then the machine line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RANKS = ("order", "family", "genus", "species")
DEFAULTS = {"tiny": {"images": 400, "references": 2000}, "paper": {"images": 32, "references": 16}}


def tower_config(towers: str):
    """The CLIBD config of the image and DNA towers (no text tower: identify does not use it)."""
    from configs import clibd as clibd_configs

    config = clibd_configs.get_config("paper" if towers == "paper" else "tiny")
    config.model.modalities = "image,dna"
    config.model.text.tokenizer = ""  # the word vocabulary below, not a hub WordPiece file
    return config


def save_run(config, workdir: pathlib.Path) -> None:
    """Randomly initialised towers as a CLIBD run directory (``train/config.json``, checkpoint, vocab)."""
    from flax import nnx

    from bioscan_jax import checkpoint as checkpoint_lib
    from bioscan_jax.data import text as text_lib
    from bioscan_jax.models import towers
    from bioscan_jax.tasks.clibd import training as clibd_train

    (workdir / "train").mkdir(parents=True)
    vocab = text_lib.TaxonomyVocab.build(["Diptera"], max_length=int(config.model.text.max_length))
    vocab.save(str(workdir / clibd_train.VOCAB_FILE))
    model = towers.ClibdModel(clibd_train.model_config(config, text_vocab_size=len(vocab)), rngs=nnx.Rngs(0))
    (workdir / "train" / "config.json").write_text(config.to_json_best_effort(indent=2))
    with checkpoint_lib.Checkpointer(workdir / "train" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"params": nnx.state(model, nnx.Param).to_pure_dict()})
        ckpt.wait()


def write_inputs(folder: pathlib.Path, n_images: int, n_references: int, rng: np.random.Generator) -> None:
    """``reference.tsv`` (labelled random barcodes, 50 species) and ``photos/`` (1024 x 768 JPEGs)."""
    from PIL import Image

    species = rng.integers(0, 50, n_references)
    bases = rng.choice(list("ACGT"), (50, 658))
    seqs = ["".join(np.where(rng.random(658) < 0.02, rng.choice(list("ACGT"), 658), bases[s])) for s in species]
    pd.DataFrame({"processid": [f"R{i}" for i in range(n_references)], "nucleotides": seqs,
                  **{f"{r}_name": [f"{r}{s % (5 * (i + 1))}" for s in species] for i, r in enumerate(RANKS)}}
                 ).to_csv(folder / "reference.tsv", sep="\t", index=False)
    (folder / "photos").mkdir()
    for i in range(n_images):
        small = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((1024, 768), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        (folder / "photos" / f"P{i:05d}.jpg").write_bytes(buf.getvalue())


def _timed_cli(argv: list[str]) -> float:
    from bioscan_jax import cli

    t0 = time.perf_counter()
    assert cli.main([*argv, "--quiet"]) == 0, argv
    return time.perf_counter() - t0


def measure(towers: str, n_images: int, n_references: int, warm_up: int) -> list[dict]:
    """Run in a child process: index the reference, identify ``warm_up`` then ``n_images`` photos."""
    from bioscan_jax import cli  # noqa: F401  (imported before the clock starts)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        config = tower_config(towers)
        save_run(config, tmp / "run")
        write_inputs(tmp, n_images, n_references, np.random.default_rng(0))
        model = ["--model", str(tmp / "run")]
        index_s = _timed_cli(["index", "--images", *model, "--reference", str(tmp / "reference.tsv"),
                              "--out", str(tmp / "index")])
        few = tmp / "few.csv"
        pd.DataFrame({"path": sorted(str(p) for p in (tmp / "photos").iterdir())[:warm_up]}).to_csv(few, index=False)
        warm_s = _timed_cli(["identify", "--images", "--reference", str(tmp / "index"), "--input", str(few),
                             "--out", str(tmp / "few.tsv")])
        run_s = _timed_cli(["identify", "--images", "--reference", str(tmp / "index"), "--input",
                            str(tmp / "photos"), "--out", str(tmp / "pred.tsv"), "--report", str(tmp / "report.html")])
        report_mb = (tmp / "report.html").stat().st_size / 2**20
    image = config.model.image
    common = {"towers": towers, "random_init": True, "image_variant": image.variant, "image_size": int(config.data.image_size),
              "dna_variant": config.model.dna.variant, "measured_under_load": True}
    return [
        {"benchmark": "index --images", **common, "references": n_references, "seconds": round(index_s, 2),
         "records_per_s": round(n_references / index_s, 2)},
        {"benchmark": "identify --images", **common, "images": n_images, "photo_px": "1024x768",
         "seconds": round(run_s, 2), "images_per_s": round(n_images / run_s, 2),
         "fixed_seconds": round(warm_s, 2), "marginal_images_per_s": round((n_images - warm_up) / max(run_s - warm_s, 1e-9), 2),
         "report_mb": round(report_mb, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--towers", default="tiny,paper", help="comma-separated: tiny, paper")
    p.add_argument("--images", type=int, default=0, help="photos to identify (0: per-tower default)")
    p.add_argument("--references", type=int, default=0, help="DNA reference records (0: per-tower default)")
    p.add_argument("--warm-up", type=int, default=4, help="photos of the run that measures the fixed cost")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ["BIOSCAN_JAX_COMPILATION_CACHE"] = "off"
    if args.child:
        for row in measure(args.towers, args.images, args.references, args.warm_up):
            print(json.dumps(row), flush=True)
        return
    for towers in args.towers.split(","):
        n_images = args.images or DEFAULTS[towers]["images"]
        n_refs = args.references or DEFAULTS[towers]["references"]
        child = subprocess.run([sys.executable, __file__, "--child", "--towers", towers, "--images", str(n_images),
                                "--references", str(n_refs), "--warm-up", str(args.warm_up)],
                               capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            sys.exit(f"{towers}: the measurement failed (rc {child.returncode}): {child.stderr.strip()[-400:]}")
        print("\n".join(lines), flush=True)
    from _common import machine_info

    print(json.dumps({"machine": machine_info()}), flush=True)


if __name__ == "__main__":
    main()
