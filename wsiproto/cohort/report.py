"""A cohort's tables: ``OUT/cohort.csv`` (per-slide areas) and the summary printed at the end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from wsiproto.cohort.layout import COHORT_CSV
from wsiproto.cohort.manifest import Manifest


def _summary(out: Path, row: dict) -> dict:
    try:
        return json.loads((out / row["folder"] / "summary.json").read_text())
    except (OSError, ValueError, KeyError):
        return {}


def write_cohort_csv(out: Path, manifest: Manifest) -> Path:
    """``OUT/cohort.csv``: one row per slide of the manifest (every run into this folder) with
    status, output folder, tissue area and per-class area in mm^2 and % of tissue from its
    ``summary.json``."""
    rows = []
    classes: list[str] = []
    for slide, row in manifest.rows.items():
        rec: dict[str, Any] = {"slide": slide, "status": row.get("status", ""),
                               "folder": row.get("folder", ""), "error": row.get("error", "")}
        if row.get("status") == "done":
            summary = _summary(out, row)
            rec["tissue_area_mm2"] = summary.get("tissue_area_mm2", "")
            pct = summary.get("class_percent_of_tissue", {})
            for name, mm2 in summary.get("class_area_mm2", {}).items():
                if name not in classes:
                    classes.append(name)
                rec[f"{name}_mm2"] = round(float(mm2), 6)
                rec[f"{name}_pct"] = pct.get(name, "")
        rows.append(rec)
    fields = ["slide", "status", "folder", "tissue_area_mm2"]
    for name in classes:
        fields += [f"{name}_mm2", f"{name}_pct"]
    fields.append("error")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    from wsiproto.files import write_text_atomic

    return write_text_atomic(out / COHORT_CSV, buf.getvalue())


def summary_table(rows: list[dict], max_rows: int, csv_path: Path) -> list[str]:
    """The per-slide table: names cut to fit, every class column as wide as its header."""
    classes = [f[:-4] for f in (rows[0].keys() if rows else []) if f.endswith("_pct")]
    width = min(48, max([len(Path(r["slide"]).name) for r in rows] + [5]))
    widths = [max(len(c) + 2, 7) for c in classes]
    head = f"{'slide':<{width}}  {'status':<7} {'tissue mm2':>10}" + "".join(
        f" {c + ' %':>{w}}" for c, w in zip(classes, widths))
    lines = [head, "-" * len(head)]
    for r in rows[:max_rows]:
        name = Path(r["slide"]).name
        name = name if len(name) <= width else "..." + name[-(width - 3):]
        tissue = f"{float(r['tissue_area_mm2']):.2f}" if r.get("tissue_area_mm2") else "-"
        pcts = "".join(f" {float(r[c + '_pct']):>{w}.1f}" if r.get(c + "_pct") else f" {'-':>{w}}"
                       for c, w in zip(classes, widths))
        lines.append(f"{name:<{width}}  {r['status']:<7} {tissue:>10}{pcts}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more in {csv_path}")
    return lines


def format_summary(result, max_rows: int = 40) -> str:
    """The text printed at the end of a run (``result``: a :class:`~wsiproto.cohort.run.
    CohortResult`): one row per slide (the first ``max_rows``), the counts, the throughput,
    failures, renamed folders and where the files are."""
    mine = set(result.slides)
    with open(result.cohort_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide"] in mine]
    lines = summary_table(rows, max_rows, result.cohort_csv)
    c = result.counts
    queued = c.get("queued", 0)
    lines += ["", f"{len(result.slides)} slide(s): {c.get('done', 0)} done "
              f"({result.ran} run now, {result.already_done} already done), "
              f"{c.get('failed', 0)} failed" + (f", {queued} not run" if queued else "")
              + (" - stopped at the first failure (--skip-errors goes on)"
                 if result.stopped_early else "")]
    if result.ran:
        lines.append(f"{result.ran} slide(s) in {result.work_s:.1f} s = "
                     f"{result.slides_per_hour:.0f} slides/hour (wall {result.wall_s:.1f} s "
                     "with cluster start)")
    for slide, reason in result.failed[:20]:
        lines.append(f"  failed: {reason if reason.startswith(slide) else f'{slide}: {reason}'}")
    if len(result.failed) > 20:
        lines.append(f"  ... {len(result.failed) - 20} more failures in {result.manifest}")
    for slide, folder, note in result.renamed[:20]:
        lines.append(f"  {Path(slide).name} -> {folder}/ ({note})")
    lines += [f"manifest: {result.manifest}", f"class areas: {result.cohort_csv}",
              f"report: {result.report}"]
    return "\n".join(lines)


__all__ = ["format_summary", "summary_table", "write_cohort_csv"]
