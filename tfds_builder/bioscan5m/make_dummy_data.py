"""Writes ``dummy_data/``: a 16-record BIOSCAN-5M in the official on-disk layout.

Two records per split, every column exercised (missing ranks, coordinates, sizes and
BioScan-1M indices; a pretrain record in chunk ``00`` and a train record in chunk
``0``), and a tiny JPEG per record for each of the four image packages (the packages
differ in colour so tests can tell them apart). Re-run only to change the fixture:

    python -m tfds_builder.bioscan5m.make_dummy_data
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
from etils import epath
from PIL import Image

from bioscan_jax.data import schema

DUMMY_DIR = epath.Path(__file__).parent / "dummy_data"

# processid -> split; DMY057-24 has md5 prefix "00" (pretrain chunk "00"),
# DMY012-24 prefix "0" (train chunk "0").
_RECORDS = [
    ("DMY057-24", "pretrain"),
    ("DMY101-24", "pretrain"),
    ("DMY012-24", "train"),
    ("DMY102-24", "train"),
    ("DMY103-24", "val"),
    ("DMY104-24", "val"),
    ("DMY105-24", "test"),
    ("DMY106-24", "test"),
    ("DMY107-24", "key_unseen"),
    ("DMY108-24", "key_unseen"),
    ("DMY109-24", "val_unseen"),
    ("DMY110-24", "val_unseen"),
    ("DMY111-24", "test_unseen"),
    ("DMY112-24", "test_unseen"),
    ("DMY002-24", "other_heldout"),
    ("DMY113-24", "other_heldout"),
]

# (class, order, family, subfamily, genus, species, bin)
_TAXA = [
    ("Insecta", "Diptera", "Cecidomyiidae", "", "", "", "BOLD:AAA0001"),
    ("Insecta", "Diptera", "", "", "", "", ""),
    ("Insecta", "Diptera", "Sciaridae", "", "Bradysia", "Bradysia hilaris", "BOLD:AAA0002"),
    ("Insecta", "Hymenoptera", "Braconidae", "Microgastrinae", "Apanteles", "Apanteles alpha", "BOLD:AAA0003"),
    ("Insecta", "Diptera", "Sciaridae", "", "Bradysia", "Bradysia hilaris", "BOLD:AAA0002"),
    ("Insecta", "Hymenoptera", "Braconidae", "Microgastrinae", "Apanteles", "Apanteles alpha", "BOLD:AAA0003"),
    ("Insecta", "Diptera", "Chironomidae", "Orthocladiinae", "Smittia", "Smittia edwardsi", "BOLD:AAA0004"),
    ("Insecta", "Hemiptera", "Cicadellidae", "Typhlocybinae", "Empoasca", "Empoasca fabae", "BOLD:AAA0005"),
    ("Insecta", "Diptera", "Phoridae", "", "Megaselia", "Megaselia sp. 1 BIOUG", "BOLD:AAA0006"),
    ("Insecta", "Coleoptera", "Staphylinidae", "Aleocharinae", "Atheta", "Atheta sp. 2 BIOUG", "BOLD:AAA0007"),
    ("Insecta", "Diptera", "Phoridae", "", "Megaselia", "Megaselia sp. 1 BIOUG", "BOLD:AAA0006"),
    ("Insecta", "Coleoptera", "Staphylinidae", "Aleocharinae", "Atheta", "Atheta sp. 2 BIOUG", "BOLD:AAA0007"),
    ("Insecta", "Diptera", "Phoridae", "", "Megaselia", "Megaselia sp. 3 BIOUG", "BOLD:AAA0008"),
    ("Arachnida", "Araneae", "Linyphiidae", "Erigoninae", "Erigone", "Erigone sp. 4 BIOUG", "BOLD:AAA0009"),
    ("Insecta", "Lepidoptera", "Noctuidae", "", "Agrotis", "Agrotis ipsilon", "BOLD:AAA0010"),
    ("Collembola", "Entomobryomorpha", "", "", "", "", "BOLD:AAA0011"),
]

_PACKAGE_COLOUR = {"cropped_256": (200, 40, 40), "original_256": (40, 200, 40), "cropped": (40, 40, 200), "original_full": (200, 200, 40)}
_PACKAGE_SIZE = {"cropped_256": (11, 8), "original_256": (12, 9), "cropped": (13, 10), "original_full": (16, 12)}


def metadata() -> pd.DataFrame:
    """The 16-record metadata frame with the official columns."""
    rng = np.random.default_rng(0)
    rows = []
    for i, ((pid, split), taxa) in enumerate(zip(_RECORDS, _TAXA, strict=True)):
        cls, order, family, subfamily, genus, species, dna_bin = taxa
        taxon = species or genus or subfamily or family or order or cls
        inferred = sum(bool(x) for x in (cls, order, family, subfamily, genus, species))
        barcode = "".join(rng.choice(list("ACGT"), size=658 - 7 * i)) + ("N" * (i % 3))
        rows.append(
            {
                "processid": pid,
                "sampleid": f"BIOUG{90000 + i}-A{i % 12 + 1:02d}",
                "taxon": taxon,
                "phylum": "Arthropoda",
                "class": cls,
                "order": order,
                "family": family,
                "subfamily": subfamily,
                "genus": genus,
                "species": species,
                "dna_bin": dna_bin,
                "dna_barcode": barcode,
                "country": "" if i == 5 else ("Canada" if i % 2 else "Costa Rica"),
                "province_state": "" if i in (5, 9) else ("Ontario" if i % 2 else "Guanacaste"),
                "coord-lat": "" if i == 5 else round(43.5 + i * 0.37, 3),
                "coord-lon": "" if i == 5 else round(-80.2 - i * 0.41, 3),
                "image_measurement_value": "" if i in (3, 7) else float(1000 + 97 * i),
                "area_fraction": round(0.2 + 0.03 * i, 4),
                "scale_factor": round(0.5 + 0.02 * i, 4),
                "inferred_ranks": inferred,
                "split": split,
                "index_bioscan_1M_insect": "" if i % 4 == 1 else 1000 + i,
                "chunk": schema.chunk_for(pid, split),
            }
        )
    return pd.DataFrame(rows, columns=list(schema.COLUMNS))


def jpeg(package: str, index: int) -> bytes:
    """A tiny JPEG for record ``index`` of ``package``."""
    colour = tuple(min(255, c + 3 * index) for c in _PACKAGE_COLOUR[package])
    img = Image.new("RGB", _PACKAGE_SIZE[package], colour)
    img.putpixel((index % img.size[0], 0), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write(root: epath.Path = DUMMY_DIR) -> None:
    """Writes the CSV and the images of every package under ``root``."""
    df = metadata()
    csv = root / schema.METADATA_RELPATH
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text(df.to_csv(index=False))
    for package in schema.IMAGE_PACKAGES:
        for i, row in df.iterrows():
            path = root / schema.image_relpath(package, row["split"], row["chunk"], row["processid"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(package, i))
    digest = hashlib.md5(csv.read_bytes()).hexdigest()
    print(f"wrote {len(df)} records under {root} (metadata md5 {digest})")


if __name__ == "__main__":
    write()
