"""``bioscan-jax``: released models on your own specimens.

  bioscan-jax embed    --model SPEC --input FILE --out OUT.npz
  bioscan-jax embed    --images --model best.pth --input FOLDER --out OUT.npz
  bioscan-jax index    --model SPEC --reference REF --out DIR
  bioscan-jax identify --model SPEC --reference REF --input FILE --out predictions.tsv
  bioscan-jax convert  --model SPEC --out DIR

SPEC: ``kmer:K``, a BarcodeBERT checkpoint (file or Hugging Face directory, any released format)
or a bioscan-jax BarcodeBERT workdir (:mod:`bioscan_jax.eval.dna_embedder`). FILE: FASTA, a BOLD
TSV, or a CSV/TSV with a ``dna_barcode`` (or ``nucleotides``) column. REF: a labelled BOLD TSV or
FASTA, ``bioscan5m:CONFIG:SPLIT`` (e.g. ``bioscan5m:dna:train+key_unseen``, with
``--manual-dir``), or a directory written by ``bioscan-jax index``.

Every input record gets an output row with a ``status``; none is dropped. ``convert`` writes a
BarcodeBERT SPEC as a bioscan-jax model directory (orbax checkpoint + ``model.json``), itself a
SPEC and usable wherever a config takes a BarcodeBERT checkpoint path (``model.dna.init``,
ZSC's ``weights='checkpoint'``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("bioscan_jax.cli")


def _embedder(args):
    from bioscan_jax.eval import dna_embedder

    return dna_embedder.resolve(args.model, num_heads=args.num_heads)


def _reference_records(ref: str, args) -> tuple[pd.DataFrame, str, dict[str, int]]:
    """``id``, ``dna_barcode`` and the rank columns of a labelled reference, its description,
    and the rows the import skipped (reason -> count)."""
    from bioscan_jax.eval.identify import RANKS

    if ref.startswith("bioscan5m:"):
        parts = ref.split(":")
        if len(parts) != 3:
            raise ValueError(f"reference {ref!r}: expected bioscan5m:CONFIG:SPLIT, e.g. bioscan5m:dna:train+key_unseen")
        from bioscan_jax.data import tfds_source
        from bioscan_jax.data import fields

        builder = tfds_source.prepare(parts[1], data_dir=args.data_dir, manual_dir=args.manual_dir)
        names = ["processid", "dna_barcode", *(fields.name_feature(r) for r in RANKS)]
        source = tfds_source.data_source(builder.builder_config, parts[2], data_dir=builder.data_dir_root, features=names)
        rows = [source[i] for i in range(len(source))]
        frame = pd.DataFrame({"id": [r["processid"] for r in rows], "dna_barcode": [r["dna_barcode"] for r in rows],
                              **{rank: [r[fields.name_feature(rank)] for r in rows] for rank in RANKS}})
        return frame, f"{builder.info.full_name} {parts[2]}", {}
    from bioscan_jax.data import bold

    # the same length rule as the training import (config.data.min_length): a short fragment
    # is no reference to match a query against
    frame, report = bold.read(ref, errors="skip", min_length=args.min_length or None)
    logger.info("reference %s: %s", ref, report)
    frame = frame.rename(columns={"processid": "id"})
    return frame, f"BOLD import {ref} ({len(frame)} records)", dict(report.skipped)


def _load_or_build_reference(args, embedder):
    from bioscan_jax.eval import identify

    if os.path.isdir(args.reference):
        reference = identify.Reference.load(args.reference)
        if embedder is not None and reference.model.get("spec") != embedder.name:
            raise ValueError(f"the index {args.reference} was made with --model {reference.model.get('spec')!r}, "
                             f"not {embedder.name!r}: make a new index or use its model")
        info = json.loads((pathlib.Path(args.reference) / identify.INDEX_INFO).read_text())
        return reference, info.get("novelty")
    frame, source, import_skipped = _reference_records(args.reference, args)
    reference = identify.build_reference(embedder, frame["id"].tolist(), frame["dna_barcode"].tolist(),
                                         identify.labels_of(frame), source=source, progress=not args.quiet)
    for reason, n in import_skipped.items():  # left out when read, before embedding
        reference.skipped[reason] = reference.skipped.get(reason, 0) + n
    return reference, None


def _novelty(reference, args) -> dict[str, Any]:
    from bioscan_jax.eval import identify

    try:
        return identify.calibrate_novelty(reference, seed=args.seed)
    except ValueError as e:
        logger.warning("novelty not calibrated: %s", e)
        return {"threshold": None, "error": str(e)}


def _image_embedder(args):
    """A CLIBD image tower: a released ``best.pth`` (or hub file) or a CLIBD run directory of
    this project, with that run's evaluation view (``data.resize``, ``data.normalize_images``)."""
    from bioscan_jax.convert import hub
    from bioscan_jax.eval import image_embedder
    from bioscan_jax.train import clibd

    resize, normalize = None, False
    run_config = clibd.saved_config(args.model)  # None unless a CLIBD run directory
    if run_config is not None:
        resize, normalize = run_config.data.get("resize"), bool(run_config.data.get("normalize_images", False))
    elif not os.path.isfile(args.model) and not (hub.is_hub_id(args.model) and ":" in args.model):
        raise ValueError(f"--model {args.model}: --images needs a CLIBD best.pth (a file, or a hub file "
                         f"owner/name:path/best.pth) or a CLIBD run directory with train/config.json")
    model = clibd.load_towers(args.model, run_config)
    return image_embedder.ImageEmbedder(model, args.model, resize=resize, normalize=normalize)


def cmd_embed(args) -> int:
    from bioscan_jax.data import specimens

    if args.images:
        from bioscan_jax.eval import image_embedder

        frame = image_embedder.read_images(args.input)
        embedder, values = _image_embedder(args), frame["path"].tolist()
    else:
        frame = specimens.read_barcodes(args.input)
        embedder, values = _embedder(args), frame["dna_barcode"].tolist()
    t0 = time.perf_counter()
    out = embedder.embed(frame["id"].tolist(), values, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, ids=frame["id"].to_numpy(dtype=str), embeddings=out.embeddings, status=np.asarray(out.status, str))
    os.replace(tmp, path)
    bad = int((~out.ok).sum())
    print(f"{len(frame)} records → {path} ({out.embeddings.shape[1]}-d, {embedder.name}, {seconds:.1f} s); "
          f"{bad} without an embedding (see 'status')", flush=True)
    return 0


def cmd_index(args) -> int:
    embedder = _embedder(args)
    reference, _ = _load_or_build_reference(args, embedder)
    novelty = _novelty(reference, args)
    reference.save(args.out)
    info_path = pathlib.Path(args.out) / "index.json"
    info = json.loads(info_path.read_text())
    info["novelty"] = novelty
    info_path.write_text(json.dumps(info, indent=2))
    print(f"indexed {len(reference.ids)} reference records with {embedder.name} → {args.out}"
          f" (left out: {reference.skipped or 'none'}; novelty AUROC {novelty.get('auroc', float('nan')):.3f})",
          flush=True)
    return 0


def cmd_identify(args) -> int:
    from bioscan_jax.data import specimens
    from bioscan_jax.eval import dna_embedder, identify

    frame = specimens.read_barcodes(args.input)
    embedder = _embedder(args) if args.model else None
    reference, novelty = _load_or_build_reference(args, embedder)
    if embedder is None:
        embedder = dna_embedder.resolve(reference.model["spec"], num_heads=args.num_heads)
    if novelty is None:
        novelty = _novelty(reference, args)
    queries = embedder.embed(frame["id"].tolist(), frame["dna_barcode"].tolist(), batch_size=args.batch_size,
                             progress=not args.quiet)
    table = identify.identify(reference, frame["id"].tolist(), queries, threshold=novelty.get("threshold"))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, sep="\t", index=False, float_format="%.6f")
    report = {"model": embedder.describe, "reference": reference.source, "reference_records": int(len(reference.ids)),
              "reference_left_out": reference.skipped, "queries": int(len(frame)),
              "queries_without_embedding": int((~queries.ok).sum()), "novelty": novelty}
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=2))
    if novelty.get("threshold") is None:
        note = f"novelty not calibrated ({novelty.get('error', 'no threshold in the index')}): the 'novel' column is empty"
    else:
        note = f"novelty threshold {novelty['threshold']:.4f}"
    print(f"{len(frame)} records identified against {len(reference.ids)} reference records → {out} "
          f"(+ {out.name}.json); {note}", flush=True)
    return 0


def cmd_convert(args) -> int:
    from bioscan_jax.convert import barcodebert as bb_load

    embedder = _embedder(args)
    if not hasattr(embedder, "loaded"):
        raise ValueError(f"--model {args.model}: k-mer counts have no weights to convert; give a BarcodeBERT SPEC")
    loaded = embedder.loaded
    out = bb_load.save(loaded, args.out)
    cfg = loaded.config
    print(f"{args.model} ({loaded.format}, k={cfg.k}, {cfg.num_layers} layers, {cfg.hidden_size}-d, "
          f"protocol {loaded.protocol.name}) → {out}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bioscan_jax.data import bold  # its MIN_LENGTH is the default of --min-length
    p = argparse.ArgumentParser(prog="bioscan-jax", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, *, model_required=True):
        sp.add_argument("--model", required=model_required, help="SPEC: kmer:K, a checkpoint, an HF directory, a workdir")
        sp.add_argument("--num-heads", type=int, default=None, help="attention heads of a checkpoint without config")
        sp.add_argument("--batch-size", type=int, default=256)
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    def reference(sp):
        sp.add_argument("--reference", required=True, help="labelled BOLD TSV/FASTA, bioscan5m:CONFIG:SPLIT or an index")
        sp.add_argument("--min-length", type=int, default=bold.MIN_LENGTH,
                        help="BOLD references: barcodes shorter than this (nt, after normalisation) are left out "
                             "and counted (default %(default)s, as config.data.min_length; 0: no minimum)")
        sp.add_argument("--data-dir", default=None, help="TFDS data dir for bioscan5m references")
        sp.add_argument("--manual-dir", default=None, help="the official BIOSCAN-5M files for bioscan5m references")
        sp.add_argument("--seed", type=int, default=0, help="seed of the novelty calibration's held-out species")

    e = sub.add_parser("embed", help="embeddings of DNA barcodes (or images) → OUT.npz (ids, embeddings, status)")
    common(e)
    e.add_argument("--input", required=True, help="barcodes: FASTA/TSV/CSV; with --images: a folder or a CSV of paths")
    e.add_argument("--images", action="store_true", help="embed specimen images with a CLIBD image tower "
                   "(--model: a CLIBD best.pth or a CLIBD run directory)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_embed)

    x = sub.add_parser("index", help="embed a labelled reference once → DIR")
    common(x)
    reference(x)
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_index)

    i = sub.add_parser("identify", help="nearest-reference taxonomy and a novel-species flag per record")
    common(i, model_required=False)
    reference(i)
    i.add_argument("--input", required=True)
    i.add_argument("--out", required=True)
    i.set_defaults(func=cmd_identify)

    c = sub.add_parser("convert", help="a BarcodeBERT SPEC → a bioscan-jax model directory (orbax + model.json)")
    common(c)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from bioscan_jax import compilation_cache, xla_cpu

    xla_cpu.apply_defaults()  # before any JAX computation (docs/performance.md)
    compilation_cache.enable()
    if args.command != "index" and not getattr(args, "model", None) and not os.path.isdir(getattr(args, "reference", "")):
        print("bioscan-jax: error: --model is needed unless --reference is an index", file=sys.stderr)
        return 2

    def out_problem(out: str, *, directory: bool) -> str | None:
        """Why ``--out`` cannot be written (``None`` if it can), found before any work: its folder
        is created and a file is made and removed there. ``directory``: --out is a folder
        (index, convert), else a file (embed, identify)."""
        import errno
        import tempfile

        path = pathlib.Path(out)
        if directory and path.exists() and not path.is_dir():
            return "it is a file, not a directory"
        if not directory and path.is_dir():
            return "it is a directory; give a file name"
        if directory and args.command == "convert" and (path / "checkpoints").exists():
            return f"{path / 'checkpoints'} exists; choose an empty --out directory"
        folder = path if directory else path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".bioscan-jax-write-check-", dir=folder)
            os.close(fd)
            os.unlink(probe)
            if not directory and path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
        except OSError as e:
            blocker = next((p for p in [*reversed(folder.absolute().parents), folder.absolute()]
                            if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                return f"{blocker} is a file, not a directory"
            reason = e.strerror or type(e).__name__
            return reason[:1].lower() + reason[1:]
        return None

    if getattr(args, "out", None):  # checked before any input is read or embedded
        problem = out_problem(args.out, directory=args.command in ("index", "convert"))
        if problem:
            print(f"bioscan-jax {args.command}: error: cannot write --out {args.out}: {problem}", file=sys.stderr)
            return 1
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:  # one line for a user's mistake
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bioscan-jax {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
