"""``bioscan-jax``: released models on your own specimens.

  bioscan-jax embed    --model SPEC --input FILE --out OUT.npz
  bioscan-jax embed    --images --model best.pth --input FOLDER --out OUT.npz
  bioscan-jax index    --model SPEC --reference REF --out DIR
  bioscan-jax identify --model SPEC --reference REF --input FILE --out predictions.tsv [--report report.html]
  bioscan-jax identify --images --model best.pth --reference REF [--reference-images LABELLED.csv]
                       --input FOLDER --out predictions.tsv [--report report.html]
  bioscan-jax convert  --model SPEC --out DIR

SPEC: ``kmer:K``, a BarcodeBERT checkpoint (file or Hugging Face directory, any released format)
or a bioscan-jax BarcodeBERT workdir (:mod:`bioscan_jax.eval.dna_embedder`). FILE: FASTA, a BOLD
TSV, or a CSV/TSV with a ``dna_barcode`` (or ``nucleotides``) column. REF: a labelled BOLD TSV or
FASTA, ``bioscan5m:CONFIG:SPLIT`` (e.g. ``bioscan5m:dna:train+key_unseen``, with
``--manual-dir``), or a directory written by ``bioscan-jax index``.

``identify --images`` matches specimen images (a folder or a CSV of paths) against a labelled DNA
reference embedded by the same CLIBD model's DNA tower, and the images of ``--reference-images``
when given (``nearest_modality`` says which kind of key was nearest); ``index --images`` embeds
such a reference once. ``--report`` writes one self-contained HTML file
(:mod:`bioscan_jax.eval.identify_report`).

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


def _clibd_towers(spec: str):
    """``(model, run config or None)`` of a CLIBD SPEC: a released ``best.pth`` (or hub file) or a
    CLIBD run directory of this project (its config gives the evaluation view and DNA tokenizer)."""
    from bioscan_jax.convert import hub
    from bioscan_jax.tasks.clibd import training as clibd

    run_config = clibd.saved_config(spec)  # None unless a CLIBD run directory
    if run_config is None and not os.path.isfile(spec) and not (hub.is_hub_id(spec) and ":" in spec):
        raise ValueError(f"--model {spec}: --images needs a CLIBD best.pth (a file, or a hub file "
                         f"owner/name:path/best.pth) or a CLIBD run directory with train/config.json")
    return clibd.load_towers(spec, run_config), run_config


def _image_embedder(args, towers=None):
    """The CLIBD image tower of ``--model`` with that run's evaluation view (``data.resize``,
    ``data.normalize_images``; CLIBD's Resize 256 -> CenterCrop 224 for a released file)."""
    from bioscan_jax.eval import image_embedder

    model, run_config = towers or _clibd_towers(args.model)
    resize, normalize = None, False
    if run_config is not None:
        resize, normalize = run_config.data.get("resize"), bool(run_config.data.get("normalize_images", False))
    return image_embedder.ImageEmbedder(model, args.model, resize=resize, normalize=normalize)


def clibd_dna_embedder(args, towers):
    """The CLIBD DNA tower of ``--model`` with the DNA tokenizer of its CLIBD evaluation: the
    run's ``model.dna.tokenization`` and ``data.max_nucleotides`` (``tasks/clibd/training.prepare``), or
    CLIBD's own v1 tokenization of 660 nt for a released ``best.pth`` (``dna_encoder.py``)."""
    from bioscan_jax.convert import barcodebert as bb_load
    from bioscan_jax.data import dna as dna_lib
    from bioscan_jax.eval import image_embedder
    from bioscan_jax.tasks.clibd import training as clibd

    model, run_config = towers
    if "dna" not in model.modalities:
        raise ValueError(f"--model {args.model}: the model has no DNA tower to embed the DNA reference "
                         f"(towers: {', '.join(model.modalities)})")
    if run_config is not None:  # the run's own tokenizer, as its training and evaluation
        tokenizer = clibd.dna_tokenizer(run_config, model.config.dna.k)
    else:  # a released best.pth: CLIBD's v1 tokenization of 660 nt (dna_encoder.py)
        tokenizer = bb_load.V1_PROTOCOL.tokenizer(model.config.dna.k, dna_lib.MAX_NUCLEOTIDES)
    return image_embedder.ClibdDnaEmbedder(model, args.model, tokenizer)


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


#: What the JSON and the printed line say when image queries meet a reference of DNA only.
IMAGES_NOT_CALIBRATED = (
    "not calibrated for images: the reference holds DNA barcodes only, and a DNA-to-DNA threshold does not "
    "carry over to image queries; give --reference-images (labelled images) to calibrate it")


def _image_mode_reference(args, towers):
    """``(keys, image embedder)`` for image queries: the labelled DNA reference through the CLIBD
    DNA tower, plus the labelled images of ``--reference-images`` through its image tower."""
    from bioscan_jax.eval import identify, image_embedder

    image_emb, dna_emb = _image_embedder(args, towers), clibd_dna_embedder(args, towers)
    frame, source, import_skipped = _reference_records(args.reference, args)
    dna_ref = identify.build_reference(dna_emb, frame["id"].tolist(), frame["dna_barcode"].tolist(),
                                       identify.labels_of(frame), source=source, progress=not args.quiet)
    for reason, n in import_skipped.items():  # left out when read, before embedding
        dna_ref.skipped[reason] = dna_ref.skipped.get(reason, 0) + n
    refs = [dna_ref.with_modality("dna")]
    if args.reference_images:
        images = image_embedder.read_images(args.reference_images)
        try:
            labels = identify.labels_of(images)
        except ValueError as e:
            raise ValueError(f"--reference-images {args.reference_images}: {e} "
                             "(give a CSV of paths with the label columns)") from None
        refs.append(identify.build_reference(
            image_emb, images["id"].tolist(), images["path"].tolist(), labels,
            source=f"images {args.reference_images} ({len(images)} records)", progress=not args.quiet,
        ).with_modality("image"))
    model = {"spec": args.model, "kind": "clibd", "image": image_emb.describe, "dna": dna_emb.describe}
    return identify.combine(refs, model), image_emb


def _image_mode_index(args):
    """``(keys, novelty)`` of an index made by ``index --images``; sets ``args.model`` to its model."""
    from bioscan_jax.eval import identify

    reference = identify.Reference.load(args.reference)
    spec = reference.model.get("spec")
    if reference.model.get("kind") != "clibd":
        raise ValueError(f"the index {args.reference} was made with --model {spec!r}, not for image queries: "
                         "make one with `bioscan-jax index --images --model <CLIBD model>`")
    if args.model and args.model != spec:
        raise ValueError(f"the index {args.reference} was made with --model {spec!r}, not {args.model!r}: "
                         "make a new index or use its model")
    args.model = spec
    info = json.loads((pathlib.Path(args.reference) / identify.INDEX_INFO).read_text())
    return reference, info.get("novelty")


def _image_novelty(reference, args) -> dict[str, Any]:
    """The novelty threshold for image queries: held-out species of the reference, queried by their
    images; not calibrated (and said so) when the reference has no images."""
    from bioscan_jax.eval import identify

    if reference.modality is None or not (reference.modality == "image").any():
        return {"threshold": None, "error": IMAGES_NOT_CALIBRATED}
    try:
        return identify.calibrate_novelty(reference, seed=args.seed, query_modality="image")
    except ValueError as e:
        logger.warning("novelty not calibrated for images: %s", e)
        return {"threshold": None, "error": f"not calibrated for images: {e}"}


def _save_index(reference, novelty, args) -> None:
    from bioscan_jax.eval import identify

    reference.save(args.out)
    info_path = pathlib.Path(args.out) / identify.INDEX_INFO
    info = json.loads(info_path.read_text())
    info["novelty"] = identify.without_scores(novelty)
    info_path.write_text(json.dumps(info, indent=2))


def cmd_index(args) -> int:
    if args.reference_images and not args.images:
        raise ValueError("--reference-images needs --images (an index for image queries)")
    if args.images:
        reference, _ = _image_mode_reference(args, _clibd_towers(args.model))
        novelty, name = _image_novelty(reference, args), args.model
    else:
        embedder = _embedder(args)
        reference, _ = _load_or_build_reference(args, embedder)
        novelty, name = _novelty(reference, args), embedder.name
    _save_index(reference, novelty, args)
    auroc = novelty.get("auroc")
    print(f"indexed {len(reference.ids)} reference records with {name} → {args.out}"
          f" (left out: {reference.skipped or 'none'}; "
          + (f"novelty AUROC {auroc:.3f})" if auroc is not None else f"novelty {novelty.get('error')})"), flush=True)
    return 0


def _calibration_scores(reference, novelty, args):
    """The calibration's held-out query scores for the report (recomputed, with the stored seed,
    when the novelty came from an index); ``None`` without a threshold."""
    from bioscan_jax.eval import identify

    if novelty.get("threshold") is None:
        return None
    if identify.CALIBRATION_SCORES not in novelty:
        novelty = identify.calibrate_novelty(reference, seed=novelty.get("seed", args.seed),
                                             query_modality=novelty.get("queries_modality"))
    return novelty[identify.CALIBRATION_SCORES]


def _write_outputs(args, table, frame, info, novelty, reference, *, images: bool) -> str:
    """``--out`` (TSV), ``--out``.json and ``--report``; returns the novelty note of the printed line."""
    from bioscan_jax.eval import identify

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, sep="\t", index=False, float_format="%.6f")
    info = {**info, "novelty": identify.without_scores(novelty)}
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=2))
    if args.report:
        from bioscan_jax.eval import identify_report

        identify_report.write_report(args.report, table, frame, info=info, threshold=novelty.get("threshold"),
                                     calibration=_calibration_scores(reference, novelty, args), images=images)
    if novelty.get("threshold") is None:
        error = novelty.get("error", "no threshold in the index")
        why = error if error.startswith("not calibrated") else f"not calibrated ({error})"
        return f"novelty {why}: the 'novel' column is empty"
    return f"novelty threshold {novelty['threshold']:.4g}"


def _identify_images(args) -> int:
    from bioscan_jax.eval import identify, image_embedder

    frame = image_embedder.read_images(args.input)
    novelty = None
    if os.path.isdir(args.reference):
        if args.reference_images:
            raise ValueError(f"--reference-images: the index {args.reference} holds its reference already; "
                             "give the images to `bioscan-jax index --images`")
        reference, novelty = _image_mode_index(args)
        image_emb = _image_embedder(args, _clibd_towers(args.model))
    else:
        reference, image_emb = _image_mode_reference(args, _clibd_towers(args.model))
    if novelty is None:
        novelty = _image_novelty(reference, args)
    queries = image_emb.embed(frame["id"].tolist(), frame["path"].tolist(), batch_size=args.batch_size,
                              progress=not args.quiet)
    table = identify.identify(reference, frame["id"].tolist(), queries, threshold=novelty.get("threshold"))
    n_images = int((reference.modality == "image").sum()) if reference.modality is not None else 0
    info = {"model": reference.model, "reference": reference.source, "reference_records": int(len(reference.ids)),
            "reference_dna_records": int(len(reference.ids)) - n_images, "reference_image_records": n_images,
            "reference_left_out": reference.skipped, "queries": int(len(frame)),
            "queries_without_embedding": int((~queries.ok).sum())}
    note = _write_outputs(args, table, frame, info, novelty, reference, images=True)
    keys = f"{len(reference.ids) - n_images} DNA barcodes" + (f" and {n_images} images" if n_images else "")
    print(f"{len(frame)} images identified against {keys} → {args.out} (+ {pathlib.Path(args.out).name}.json); "
          f"{info['queries_without_embedding']} without an embedding (see 'status'); {note}", flush=True)
    return 0


def cmd_identify(args) -> int:
    from bioscan_jax.data import specimens
    from bioscan_jax.eval import dna_embedder, identify

    if args.images:
        return _identify_images(args)
    if args.reference_images:
        raise ValueError("--reference-images needs --images (image queries)")
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
    info = {"model": embedder.describe, "reference": reference.source, "reference_records": int(len(reference.ids)),
            "reference_left_out": reference.skipped, "queries": int(len(frame)),
            "queries_without_embedding": int((~queries.ok).sum())}
    note = _write_outputs(args, table, frame, info, novelty, reference, images=False)
    print(f"{len(frame)} records identified against {len(reference.ids)} reference records → {args.out} "
          f"(+ {pathlib.Path(args.out).name}.json); {note}", flush=True)
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

    def images(sp, what):
        sp.add_argument("--images", action="store_true", help=f"{what} with a CLIBD model's towers (--model: a CLIBD "
                        "best.pth or run directory): the DNA reference through its DNA tower")
        sp.add_argument("--reference-images", default=None, help="with --images: labelled reference images, a CSV/TSV "
                        "of paths with order, family, genus, species columns; also calibrates novelty for images")

    x = sub.add_parser("index", help="embed a labelled reference once → DIR")
    common(x)
    reference(x)
    images(x, "index for image queries")
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_index)

    i = sub.add_parser("identify", help="nearest-reference taxonomy and a novel-species flag per record")
    common(i, model_required=False)
    reference(i)
    images(i, "identify specimen images (--input: a folder or a CSV of paths)")
    i.add_argument("--input", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--report", default=None, help="also write a self-contained HTML report (summary, novelty "
                   "plot, one row per record) to this file")
    i.set_defaults(func=cmd_identify)

    c = sub.add_parser("convert", help="a BarcodeBERT SPEC → a bioscan-jax model directory (orbax + model.json)")
    common(c)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from bioscan_jax import compilation_cache, malloc_tuning, xla_cpu

    xla_cpu.apply_defaults()  # before any JAX computation (docs/performance.md)
    malloc_tuning.configure()  # before the backend starts its threads
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

    for flag in ("out", "report"):  # checked before any input is read or embedded
        target = getattr(args, flag, None)
        problem = target and out_problem(target, directory=flag == "out" and args.command in ("index", "convert"))
        if problem:
            print(f"bioscan-jax {args.command}: error: cannot write --{flag} {target}: {problem}", file=sys.stderr)
            return 1
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:  # one line for a user's mistake
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bioscan-jax {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
