"""BOLD import benchmark: wall time and peak memory of :func:`bioscan_jax.data.bold.read` on a
realistic BOLD TSV of N rows.

For each size it writes (or reuses, with ``--data-dir``) a TSV in BOLD's classic export layout:
the 17 columns the import reads (processid, sampleid, ``<rank>_name``, bin_uri, nucleotides of
about 658 nt, markercode, country, province_state, lat, lon) and 19 it does not read (ids,
taxIDs, collectors, dates, ...), so the file is realistically wide, with a few rows the import
must skip (no barcode, another marker, a duplicate processid). The generator is vectorised
(numpy) and runs in a subprocess. Then it imports the file in a fresh subprocess and prints one
JSON line per size::

    {"rows", "file_mb", "wall_s", "peak_rss_mb", "rss_per_file", "rss_per_row_kb",
     "rows_mapped", "rows_skipped", "load_avg", "machine"}

``peak_rss_mb`` is the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (interpreter,
pandas and the frame included; ``baseline_rss_mb`` is the same before the import starts;
``vm_hwm_mb``, the kernel's high-water mark of the process image, agrees). A child inherits its
parent's ``ru_maxrss`` through fork and exec, hence the small parent. ``rss_per_file`` is peak
RSS over file size. A child whose RSS passes ``--max-rss-gb`` is killed (a memory-hungry import
must not take the machine down) and reported with ``"error"``. ``wall_s`` depends on the
machine's load (``load_avg``): compare runs made together.

    python benchmarks/bold_import_benchmark.py                        # 200000 and 2000000 rows
    python benchmarks/bold_import_benchmark.py --rows 50000 --data-dir /tmp/boldbench
    python benchmarks/bold_import_benchmark.py --bold-module /tmp/bold_old.py   # another bold.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATOR_VERSION = 1

#: Columns of BOLD's classic TSV export: the 17 the import reads and 19 it does not read.
BOLD_COLUMNS = (
    "processid", "sampleid", "recordID", "catalognum", "fieldnum", "institution_storing", "bin_uri",
    "phylum_taxID", "phylum_name", "class_taxID", "class_name", "order_taxID", "order_name", "family_taxID",
    "family_name", "subfamily_taxID", "subfamily_name", "genus_taxID", "genus_name", "species_taxID",
    "species_name", "identification_provided_by", "collectors", "collectiondate_start", "lifestage", "sex",
    "lat", "lon", "elev", "country", "province_state", "image_ids", "markercode", "genbank_accession",
    "nucleotides", "trace_ids",
)  # fmt: skip
_COUNTRIES = np.array(["Canada", "Costa Rica", "South Africa", "Pakistan", "Thailand", "Australia",
                       "Germany", "United States", "Brazil", "Madagascar"])  # fmt: skip
_PROVINCES = np.array(["Ontario", "Alajuela", "Western Cape", "Punjab", "Chiang Mai", "Queensland",
                       "Bavaria", "California", "Amazonas", "Toamasina", ""])  # fmt: skip
_ORDERS = np.array(["Diptera", "Hymenoptera", "Coleoptera", "Lepidoptera", "Hemiptera", "Psocodea",
                    "Trichoptera", "Araneae", "Orthoptera", "Thysanoptera"])  # fmt: skip
_SYLLABLES = np.array(["ab", "la", "bes", "my", "ia", "chi", "ro", "no", "mus", "ca", "dro", "so",
                       "phi", "la", "cer", "ato", "po", "gon", "tri", "cho", "cera", "ptera", "ne", "ura"])  # fmt: skip
_ACGT = np.frombuffer(b"ACGT", dtype=np.uint8)


def _names(rng: np.random.Generator, n: int, syllables: int, capital: bool = True) -> np.ndarray:
    parts = _SYLLABLES[rng.integers(0, len(_SYLLABLES), (n, syllables))]
    out = parts[:, 0].astype(object)
    for i in range(1, syllables):
        out = out + parts[:, i]
    out = out.astype(str)
    return np.char.capitalize(out) if capital else out


def _taxonomy(rng: np.random.Generator, species: int) -> dict[str, np.ndarray]:
    """A consistent tree: ``species`` species in species/20 genera in 400 families in 10 orders."""
    genera = max(1, species // 20)
    families = min(400, genera)
    family_names = np.char.add(_names(rng, families, 3), "idae")
    family_order = _ORDERS[rng.integers(0, len(_ORDERS), families)]
    genus_names = _names(rng, genera, 3)
    genus_family = rng.integers(0, families, genera)
    species_genus = rng.integers(0, genera, species)
    epithets = _names(rng, species, 3, capital=False)
    species_names = np.char.add(np.char.add(genus_names[species_genus], " "), epithets)
    family = genus_family[species_genus]
    return {
        "species_name": species_names,
        "genus_name": genus_names[species_genus],
        "family_name": family_names[family],
        "order_name": family_order[family],
        "bin_uri": np.char.add("BOLD:A", np.char.zfill(np.arange(species).astype(str), 6)),
    }


def _column(values: np.ndarray | str, n: int) -> np.ndarray:
    if isinstance(values, str):
        return np.full(n, values, dtype=object)
    return np.asarray(values).astype(str).astype(object)


def _block(rng: np.random.Generator, start: int, n: int, tax: dict[str, np.ndarray]) -> bytes:
    """Rows ``start`` .. ``start + n`` as TSV bytes (vectorised: object-array string adds)."""
    idx = np.arange(start, start + n)
    sp = rng.integers(0, len(tax["species_name"]), n)
    unnamed = rng.random(n) < 0.3  # BOLD: many records are identified to genus only
    species = np.where(unnamed, "", tax["species_name"][sp])
    # barcodes: ~658 nt of ACGT, some with gap runs at the ends or a few Ns (as BOLD exports them)
    seq = _ACGT[rng.integers(0, 4, (n, 658), dtype=np.uint8)]
    ragged = rng.random(n) < 0.1
    lead = np.where(ragged, rng.integers(0, 40, n), 0)
    cols = np.arange(658)
    seq[cols[None, :] < lead[:, None]] = ord("-")
    seq[(rng.random((n, 658)) < 0.001)] = ord("N")
    barcodes = seq.view("S658").ravel().astype(str).astype(object)
    barcodes[idx % 997 == 3] = ""  # no barcode: skipped as missing_barcode
    marker = np.where(idx % 1009 == 5, "ITS", "COI-5P")  # another marker: skipped as other_marker
    processid = np.char.add(np.char.add("BIOSC", np.char.zfill((idx % 99_991).astype(str), 5)),
                            np.char.add("-", (10 + idx // 99_991).astype(str)))
    dup = idx % 1013 == 7
    processid[dup] = np.char.add("BIOSC", np.char.zfill(((idx[dup] - 1) % 99_991).astype(str), 5))
    processid[dup] = np.char.add(processid[dup], np.char.add("-", (10 + (idx[dup] - 1) // 99_991).astype(str)))
    lat = np.round(rng.uniform(-60, 70, n), 4).astype(str)
    lon = np.round(rng.uniform(-170, 170, n), 4).astype(str)
    country = rng.integers(0, len(_COUNTRIES), n)
    values = {
        "processid": processid,
        "sampleid": np.char.add("BIOUG", np.char.zfill(idx.astype(str), 8)),
        "recordID": (10_000_000 + idx).astype(str),
        "catalognum": np.char.add("CCDB-", idx.astype(str)),
        "fieldnum": np.char.add("L#", (idx // 96).astype(str)),
        "institution_storing": "Centre for Biodiversity Genomics",
        "collection_code": "",
        "bin_uri": np.where(rng.random(n) < 0.05, "", tax["bin_uri"][sp]),
        "phylum_taxID": "20",
        "phylum_name": "Arthropoda",
        "class_taxID": "82",
        "class_name": "Insecta",
        "order_taxID": (100 + np.searchsorted(_ORDERS, tax["order_name"][sp])).astype(str),
        "order_name": tax["order_name"][sp],
        "family_taxID": "",
        "family_name": tax["family_name"][sp],
        "genus_name": tax["genus_name"][sp],
        "species_name": species,
        "identification_provided_by": "BIOSCAN Team",
        "identification_method": "BOLD ID Engine (Tree Based Identification)",
        "voucher_status": "Vouchered:Registered Collection",
        "tissue_type": "Whole Voucher",
        "collection_event_id": np.char.add("GMP#", (idx // 500).astype(str)),
        "collectors": "BIOSCAN Malaise Program",
        "collectiondate_start": "2019-07-14",
        "site_code": np.char.add("BIOSCAN-", (idx // 2000).astype(str)),
        "sampling_protocol": "Malaise Trap",
        "lifestage": "adult",
        "lat": lat,
        "lon": lon,
        "coord_source": "GPS",
        "elev": rng.integers(0, 2500, n).astype(str),
        "country": _COUNTRIES[country],
        "province_state": _PROVINCES[np.minimum(country, len(_PROVINCES) - 1)],
        "region": "",
        "image_ids": (20_000_000 + idx).astype(str),
        "image_urls": np.char.add("http://www.boldsystems.org/pics/BIOUG/", np.char.add(idx.astype(str), "+1.jpg")),
        "copyright_holders": "CBG Photography Group",
        "copyright_years": "2019",
        "copyright_licenses": "CreativeCommons - Attribution Non-Commercial Share-Alike",
        "copyright_institutions": "Centre for Biodiversity Genomics",
        "photographers": "CBG Photography Group",
        "sequenceID": (30_000_000 + idx).astype(str),
        "markercode": marker,
        "genbank_accession": "",
        "nucleotides": barcodes,
        "trace_ids": np.char.add(np.char.add((40_000_000 + idx).astype(str), "|"), (40_000_001 + idx).astype(str)),
        "trace_names": np.char.add(processid, "[LepF1,LepR1]_F.ab1"),
        "run_dates": "2019-09-01 10:22:33",
        "sequencing_centers": "Centre for Biodiversity Genomics",
        "directions": "F|R",
        "seq_primers": "LepF1|LepR1",
        "marker_codes": np.char.add(marker, ":COI-5P"),
    }
    line = _column(values.get(BOLD_COLUMNS[0], ""), n)
    for name in BOLD_COLUMNS[1:]:
        line = line + "\t" + _column(values.get(name, ""), n)
    return ("\n".join(line.tolist()) + "\n").encode()


def generate(path: pathlib.Path, rows: int, *, seed: int = 0, block: int = 50_000) -> None:
    """Writes a BOLD-style TSV of ``rows`` records to ``path`` (atomically)."""
    rng = np.random.default_rng(seed)
    tax = _taxonomy(rng, species=max(50, min(40_000, rows // 25)))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(("\t".join(BOLD_COLUMNS) + "\n").encode())
        for start in range(0, rows, block):
            f.write(_block(rng, start, min(block, rows - start), tax))
    os.replace(tmp, path)


_CHILD = r"""
import importlib.util, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[3]:
    spec = importlib.util.spec_from_file_location("bold_under_test", sys.argv[3])
    bold = sys.modules["bold_under_test"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bold)
else:
    from bioscan_jax.data import bold
import pandas, pyarrow  # loaded before the baseline, as an import loads them
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
frame, report = bold.read(sys.argv[2])
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "peak_rss_kb": peak, "baseline_rss_kb": baseline, "vm_hwm_kb": hwm,
                  "rows_mapped": len(frame), "rows_skipped": report.rows_skipped,
                  "skipped": report.skipped}))
"""


def machine_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = "?"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM"


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(path: pathlib.Path, bold_module: str, max_rss_gb: float) -> dict:
    """Imports ``path`` in a fresh subprocess; kills it if its RSS passes ``max_rss_gb``."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO_ROOT), str(path), bold_module],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, seen = time.perf_counter(), 0
    while proc.poll() is None:
        seen = max(seen, _rss_kb(proc.pid))
        if seen > max_rss_gb * 2**20:
            proc.kill()
            proc.wait()
            return {"error": f"killed: RSS passed --max-rss-gb {max_rss_gb:g} after {time.perf_counter() - t0:.0f} s",
                    "peak_rss_mb": round(seen / 1024, 1)}
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--data-dir", default=None, help="keep (and reuse) the generated TSVs here")
    parser.add_argument("--bold-module", default="", help="import this bold.py instead of bioscan_jax.data.bold")
    parser.add_argument("--max-rss-gb", type=float, default=None,
                        help="kill a child above this RSS (default: 75%% of the memory available now)")
    parser.add_argument("--generate", nargs=2, metavar=("PATH", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(pathlib.Path(args.generate[0]), int(args.generate[1]))
        return
    if args.max_rss_gb is None:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
        args.max_rss_gb = round(0.75 * avail / 2**20, 1)
    machine = machine_line()
    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="bold_bench_")
    folder = pathlib.Path(args.data_dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for rows in args.rows:
            path = folder / f"bold_v{GENERATOR_VERSION}_{rows}.tsv"
            generate_s = 0.0
            if not path.exists():
                t0 = time.perf_counter()  # in a subprocess: this process stays small (see the docstring)
                subprocess.run([sys.executable, __file__, "--generate", str(path), str(rows)], check=True)
                generate_s = time.perf_counter() - t0
            size = path.stat().st_size
            result = measure(path, args.bold_module, args.max_rss_gb)
            record = {"rows": rows, "file_mb": round(size / 2**20, 1)}
            if "error" in result:
                record.update(result)
            else:
                peak = result["peak_rss_kb"] * 1024
                record.update(wall_s=round(result["wall_s"], 2), peak_rss_mb=round(peak / 2**20, 1),
                              rss_per_file=round(peak / size, 2), rss_per_row_kb=round(peak / rows / 1024, 2),
                              baseline_rss_mb=round(result["baseline_rss_kb"] / 1024, 1),
                              vm_hwm_mb=round(result["vm_hwm_kb"] / 1024, 1),
                              rows_mapped=result["rows_mapped"], rows_skipped=result["rows_skipped"],
                              skipped=result["skipped"])
            record.update(generate_s=round(generate_s, 1), bold_module=args.bold_module or "bioscan_jax.data.bold",
                          load_avg=round(os.getloadavg()[0], 2), machine=machine)
            print(json.dumps(record), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
