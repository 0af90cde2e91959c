"""One self-contained HTML report of ``bioscan-jax identify --report`` (DNA barcodes or images).

The file needs no network and no other file: the plot and the image thumbnails are ``data:`` URIs,
the CSS and the little JavaScript (sort by a column, filter rows) are inline. It holds:

* a summary: records per ``status``, flagged novel / known, the novelty threshold and its
  calibration, and, when the input carries label columns (``order``, ``family``, ``genus``,
  ``species``, or BOLD's ``<rank>_name``), the agreement of the predictions with them per rank;
* a matplotlib plot: the queries' novel scores over the reference calibration's scores of known
  and held-out species, with the threshold;
* one table row per input record (``tr.record``), in the order of the predicted family: the
  thumbnail (images), the predicted order, family, genus and species with their similarity, the
  nearest reference record (and its modality), the novel flag and score, the status; a label the
  input gives that differs from the prediction is shown under it.
"""

from __future__ import annotations

import base64
import html
import io
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

RANKS = ("order", "family", "genus", "species")
THUMBNAIL_PX = 96


def label_columns(frame: pd.DataFrame) -> dict[str, str]:
    """rank -> the input's label column for it (``<rank>`` or BOLD's ``<rank>_name``)."""
    lower = {str(c).lower(): c for c in frame.columns}
    out = {}
    for rank in RANKS:
        column = lower.get(rank, lower.get(f"{rank}_name"))
        if column is not None:
            out[rank] = column
    return out


def given_labels(frame: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
    """rank -> ``[n]`` str labels the input gives ('' where missing)."""
    return {rank: frame[col].fillna("").astype(str).str.strip().to_numpy()[:n]
            for rank, col in label_columns(frame).items()}


def summarize(table: pd.DataFrame, labels: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Counts per status, novel / known / unflagged, and the agreement with the given labels."""
    novel = table["novel"].fillna("").astype(str)
    out: dict[str, Any] = {
        "records": int(len(table)),
        "status": {str(k): int(v) for k, v in table["status"].value_counts(sort=True).items()},
        "novel": int((novel == "true").sum()), "known": int((novel == "false").sum()),
        "not_flagged": int((novel == "").sum()), "agreement": {}}
    for rank, given in labels.items():
        pred = table[rank].fillna("").astype(str).to_numpy()
        both = (given != "") & (pred != "")
        agree = int((pred[both] == given[both]).sum())
        out["agreement"][rank] = {"compared": int(both.sum()), "agree": agree,
                                  "fraction": agree / both.sum() if both.any() else float("nan")}
    return out


def novelty_plot(table: pd.DataFrame, threshold: float | None,
                 calibration: Mapping[str, np.ndarray] | None) -> bytes:
    """PNG: histograms of the queries' novel scores and the calibration's, and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(7.5, 3.2), dpi=110)
    ax = fig.add_subplot()
    queries = pd.to_numeric(table["novel_score"], errors="coerce").to_numpy(float)
    queries = queries[np.isfinite(queries)]
    groups = [(queries, "your records", "#1f5fa8")]
    if calibration is not None:
        groups += [(np.asarray(calibration["known"], float), "calibration: known species", "#3a9a4a"),
                   (np.asarray(calibration["novel"], float), "calibration: held-out species", "#d9822b")]
    values = np.concatenate([g[0] for g in groups if g[0].size] or [np.zeros(1)])
    bins = np.linspace(min(0.0, values.min()), max(values.max(), (threshold or 0) + 1e-3, 1e-3), 40)
    for data, name, colour in groups:
        if data.size:
            ax.hist(data, bins=bins, density=True, histtype="step" if name != "your records" else "stepfilled",
                    alpha=0.35 if name == "your records" else 1.0, color=colour, linewidth=1.6,
                    label=f"{name} ({data.size})")
    if threshold is not None:
        ax.axvline(threshold, color="#b22222", linestyle="--", label=f"threshold {threshold:.4f}")
    else:
        ax.set_title("no novelty threshold: not calibrated for these queries", fontsize=9)
    ax.set_xlabel("novel score = 1 - similarity of the nearest species-labelled reference record")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def thumbnail(path: str, size: int = THUMBNAIL_PX) -> bytes | None:
    """A small JPEG of an image file (decoded at reduced scale when large), or None if unreadable."""
    from PIL import Image

    from bioscan_jax.eval.image_embedder import open_checked

    try:
        img, _ = open_checked(pathlib.Path(path).read_bytes()) if path else (None, "")
        if img is None:
            return None
        if img.format == "JPEG":
            img.draft("RGB", (size * 2, size * 2))
        img.thumbnail((size, size))
        rgba = img.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        buf = io.BytesIO()
        flat.save(buf, "JPEG", quality=80)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - any unreadable file: no thumbnail, its status says why
        return None


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _e(value: Any) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))


def _rank_cell(name: str, sim: Any, given: str | None) -> str:
    sim = float(sim) if sim not in ("", None) and np.isfinite(float(sim)) else None
    text = f"{_e(name)}<span class=sim>{sim:.3f}</span>" if name and sim is not None else _e(name)
    if given and name and given != name:
        text += f"<div class=given>given: {_e(given)}</div>"
    elif given and name:
        text += "<span class=agree title='agrees with the given label'>&#10003;</span>"
    return f"<td data-sort='{_e(name)}'>{text}</td>"


def _record_row(row: Mapping[str, Any], given: Mapping[str, str], thumb: str | None, images: bool) -> str:
    cells = []
    if images:
        cells.append(f"<td class=thumb><img alt='{_e(row['id'])}' src='{thumb}'></td>" if thumb
                     else "<td class=thumb>&mdash;</td>")
    cells.append(f"<td>{_e(row['id'])}</td>")
    for rank in RANKS:
        cells.append(_rank_cell(str(row[rank] or ""), row[f"{rank}_similarity"], given.get(rank)))
    nearest = _e(row["nearest_id"])
    if row.get("nearest_modality"):
        nearest += f"<span class=sim>{_e(row['nearest_modality'])}</span>"
    cells.append(f"<td>{nearest}</td>")
    novel = str(row["novel"] or "")
    cells.append(f"<td class='novel-{novel or 'none'}'>{_e(novel or '—')}</td>")
    score = row["novel_score"]
    score_ok = score not in ("", None) and np.isfinite(float(score))
    cells.append(f"<td data-sort='{float(score) if score_ok else ''}'>{f'{float(score):.4f}' if score_ok else ''}</td>")
    status = str(row["status"])
    cells.append(f"<td class='{'ok' if status.startswith('ok') else 'bad'}'>{_e(status)}</td>")
    return "<tr class=record>" + "".join(cells) + "</tr>"


def _percent(fraction: float) -> str:
    return "" if np.isnan(fraction) else f"{100 * fraction:.1f}%"


def _summary_html(summary: Mapping[str, Any], info: Mapping[str, Any], threshold: float | None) -> str:
    novelty = info.get("novelty", {})
    status_rows = "".join(f"<tr><td>{_e(k)}</td><td class=num>{v}</td></tr>" for k, v in summary["status"].items())
    if threshold is None:
        threshold_line = f"<p class=warn>Novelty: {_e(novelty.get('error', 'no threshold'))}.</p>"
    else:
        threshold_line = (f"<p>Novelty threshold <b>{threshold:.4f}</b> (calibrated on the reference: AUROC "
                          f"{novelty.get('auroc', float('nan')):.3f}, precision {novelty.get('precision', float('nan')):.2f}"
                          f", recall {novelty.get('recall', float('nan')):.2f}; {_e(novelty.get('rule', ''))}).</p>")
    agreement = ""
    if summary["agreement"]:
        rows = "".join(f"<tr><td>{rank}</td><td class=num>{a['agree']} / {a['compared']}</td>"
                       f"<td class=num>{_percent(a['fraction'])}</td></tr>" for rank, a in summary["agreement"].items())
        agreement = ("<h3>Agreement with the labels in your input</h3><table class=small><tr><th>rank</th>"
                     f"<th>agree / compared</th><th>%</th></tr>{rows}</table>")
    return (f"<p>{summary['records']} records; reference: {_e(info.get('reference'))}, "
            f"{info.get('reference_records', '?')} records embedded; model: {_e(info.get('model', {}).get('spec'))}.</p>"
            f"<p>Flagged <b>novel</b>: {summary['novel']} &middot; known: {summary['known']} &middot; "
            f"not flagged: {summary['not_flagged']}</p>{threshold_line}"
            f"<h3>Status</h3><table class=small><tr><th>status</th><th>records</th></tr>{status_rows}</table>{agreement}")


CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
table.records th{cursor:pointer;background:#f2f4f7;position:sticky;top:0}table.records th:hover{background:#e3e8ef}
.num{text-align:right}.sim{color:#777;font-size:11px;margin-left:6px;white-space:nowrap}.given{color:#b22222;font-size:11px}
.agree{color:#2e7d32;margin-left:4px}.novel-true{color:#b22222;font-weight:600}.novel-false{color:#2e7d32}
.bad{color:#b22222}.warn{color:#8a5300;background:#fff4e0;padding:6px 10px}.thumb img{width:72px;height:72px;
object-fit:contain;background:#eee}#filter{margin:8px 0;padding:4px 8px;width:320px}
"""

JS = """
(function(){
  var table=document.querySelector('table.records'), body=table.tBodies[0];
  function key(row,col){var c=row.cells[col],v=c.hasAttribute('data-sort')?c.getAttribute('data-sort'):c.textContent.trim();
    var n=Number(v);return (v!==''&&!isNaN(n))?[0,n]:[1,v.toLowerCase()];}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){th.addEventListener('click',function(){
    var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a,col),y=key(b,col),c=x[0]-y[0]||(x[1]<y[1]?-1:x[1]>y[1]?1:0);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});
  document.getElementById('filter').addEventListener('input',function(e){var q=e.target.value.toLowerCase();
    Array.prototype.forEach.call(body.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});
})();
"""


def _records_html(table: pd.DataFrame, labels: Mapping[str, np.ndarray], paths: list[str] | None) -> str:
    images = paths is not None
    order = np.lexsort((table["id"].astype(str).to_numpy(), table["species"].fillna("").astype(str).to_numpy(),
                        table["family"].fillna("").astype(str).replace("", "\uffff").to_numpy()))
    head = (["image"] if images else []) + ["id", *RANKS, "nearest reference", "novel", "novel score", "status"]
    rows = []
    records = table.to_dict("records")
    for i in order:
        thumb = thumbnail(paths[i]) if images else None
        rows.append(_record_row(records[i], {r: v[i] for r, v in labels.items()},
                                data_uri(thumb, "image/jpeg") if thumb else None, images))
    return ("<input id=filter placeholder='filter rows (any text)'>"
            "<table class=records><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "\n".join(rows) + "</tbody></table>")


def write_report(path: str | os.PathLike, table: pd.DataFrame, frame: pd.DataFrame, *, info: Mapping[str, Any],
                 threshold: float | None, calibration: Mapping[str, np.ndarray] | None, images: bool) -> None:
    """Writes the report (module docstring) of ``table`` (``identify.identify``'s rows, in the
    order of ``frame``, the input records: their label columns, and ``path`` for images)."""
    labels = given_labels(frame, len(table))
    summary = summarize(table, labels)
    plot = data_uri(novelty_plot(table, threshold, calibration), "image/png")
    kind = "images" if images else "DNA barcodes"
    title = f"bioscan-jax identify: {len(table)} {kind}"
    body = (f"<h1>{_e(title)}</h1><h2>Summary</h2>{_summary_html(summary, info, threshold)}"
            f"<h2>Novel scores</h2><img alt='novel-score distribution' src='{plot}'>"
            f"<h2>Records</h2><p>Grouped by predicted family; click a column to sort.</p>"
            f"{_records_html(table, labels, frame['path'].tolist() if images else None)}")
    text = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}<script>{JS}</script></body></html>")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
