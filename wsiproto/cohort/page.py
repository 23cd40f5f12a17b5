"""``OUT/report.html``: one static page to look at a cohort.

One row per manifest row: the slide's overlay as a small inline JPEG, its class composition as
a bar, tissue mm², status, duration and, for a failure, the one-line reason; above the table a
chart of the class composition across slides (one column per slide, sorted by the first class's
share; slides are pooled into at most :data:`MAX_COLUMNS` columns) with the cohort's pooled
composition. Clicking a column header sorts the rows (a few lines of inline script).

One file, nothing fetched at view time: images are ``data:`` URIs and a Content-Security-Policy
forbids any other source. The page is rewritten atomically as slides finish, at most every
``min_interval_s`` and never more often than 20 times its own writing time, so that a cohort of
thousands does not spend its time rewriting it; the last write is forced at the end.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsiproto.cohort.layout import REPORT

THUMB_BOX = (160, 120)
MAX_COLUMNS = 400

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse;width:100%} td,th{border-bottom:1px solid #ddd;padding:4px 6px;
text-align:left;vertical-align:middle} th[data-key]{cursor:pointer;white-space:nowrap}
th[data-key]:hover{background:#eef} td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:flex;width:180px;height:14px;border:1px solid #999;background:#fff}
.bar span{display:block;height:100%} .failed{color:#b00020} .queued{color:#777}
.err{color:#b00020;max-width:480px;word-break:break-word} .sub{color:#777;font-size:11px}
.legend span.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;
vertical-align:-2px;border:1px solid #999} img{display:block}
"""

SCRIPT = """
document.querySelectorAll('th[data-key]').forEach(function (th) {
  th.addEventListener('click', function () {
    var key = th.dataset.key, body = document.querySelector('#slides tbody');
    var desc = th.dataset.dir !== 'desc';
    th.dataset.dir = desc ? 'desc' : 'asc';
    var value = function (r) { var v = r.dataset[key], n = parseFloat(v);
                               return isNaN(n) ? v : n; };
    var rows = Array.prototype.slice.call(body.rows).sort(function (a, b) {
      var x = value(a), y = value(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


@dataclass
class Entry:
    """What the page shows of one slide."""

    slide: str
    folder: str
    status: str
    duration_s: float | None = None
    tissue_mm2: float | None = None
    percent: dict[str, float] = field(default_factory=dict)  # class -> % of tissue
    colors: dict[str, list[int]] = field(default_factory=dict)  # class -> RGB
    thumbnail: str = ""  # a data: URI
    error: str = ""
    note: str = ""  # why the folder is not the slide's file name
    traceback: str = ""  # a failure's traceback file, relative to OUT


def thumbnail_uri(folder: str | Path, summary: dict, box: tuple[int, int] = THUMB_BOX) -> str:
    """The slide's ``overlay.png`` without its legend panel, fit into ``box``, as a
    ``data:image/jpeg;base64,...`` URI ("" when there is no overlay to read)."""
    from PIL import Image

    path = Path(folder) / summary.get("outputs", {}).get("overlay", "overlay.png")
    frame = summary.get("label_frame", {})
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if frame.get("width") and frame.get("height"):  # the legend is on the right
                width = round(img.height * frame["width"] / frame["height"])
                if 0 < width < img.width:
                    img = img.crop((0, 0, width, img.height))
            img.thumbnail(box)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
    except (OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def class_colors(summary: dict) -> dict[str, list[int]]:
    return {lab["name"]: list(lab["color"]) for lab in summary.get("labels", [])
            if "color" in lab}


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def entry_from_row(row: dict, out: Path, result: dict | None = None) -> Entry:
    """The entry of a manifest row; a done slide's figures come from its worker's ``result``
    or, for a slide done in an earlier run, from its ``summary.json`` and ``overlay.png``."""
    entry = Entry(row["slide"], row.get("folder", ""), row.get("status", ""),
                  _float(row.get("duration_s")), error=row.get("error", ""),
                  note=row.get("folder_note", ""), traceback=row.get("traceback", ""))
    if entry.status != "done":
        return entry
    if result is None:
        folder = out / entry.folder
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            return entry
        result = {"tissue_area_mm2": summary.get("tissue_area_mm2"),
                  "class_percent_of_tissue": summary.get("class_percent_of_tissue", {}),
                  "class_colors": class_colors(summary),
                  "thumbnail": thumbnail_uri(folder, summary)}
    entry.tissue_mm2 = _float(result.get("tissue_area_mm2"))
    entry.percent = {k: float(v) for k, v in result.get("class_percent_of_tissue", {}).items()}
    entry.colors = dict(result.get("class_colors", {}))
    entry.thumbnail = result.get("thumbnail", "")
    return entry


def _rgb(c) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in c[:3])


def _bar(entry: Entry, classes: dict[str, list[int]]) -> str:
    parts = "".join(
        f'<span style="width:{entry.percent.get(name, 0):.2f}%;background:{_rgb(rgb)}" '
        f'title="{html.escape(name)} {entry.percent.get(name, 0):.1f}%"></span>'
        for name, rgb in classes.items() if entry.percent.get(name, 0) > 0)
    return f'<div class="bar">{parts}</div>' if parts else ""


def _row(entry: Entry, classes: dict[str, list[int]]) -> str:
    e = html.escape
    name = entry.slide.replace("\\", "/").rsplit("/", 1)[-1]
    sub = (f'<div class="sub" title="{e(entry.note)}">in {e(entry.folder)}/</div>'
           if entry.note else "")
    error = e(entry.error) + (f' <a href="{e(entry.traceback)}">traceback</a>'
                              if entry.traceback else "")
    img = f'<img src="{entry.thumbnail}" alt="">' if entry.thumbnail else ""
    pcts = [entry.percent.get(c) for c in classes]
    attrs = "".join(f' data-c{i}="{-1 if p is None else p:.3f}"' for i, p in enumerate(pcts))
    cells = "".join(f'<td class="n">{"" if p is None else f"{p:.1f}"}</td>' for p in pcts)
    num = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    return (
        f'<tr data-name="{e(name.lower())}" data-status="{e(entry.status)}" '
        f'data-duration="{num(entry.duration_s, ".3f") or -1}" '
        f'data-tissue="{num(entry.tissue_mm2, ".6f") or -1}"{attrs}>'
        f'<td>{img}</td><td title="{e(entry.slide)}">{e(name)}{sub}</td>'
        f'<td class="{e(entry.status)}">{e(entry.status)}</td>'
        f'<td class="n">{num(entry.duration_s, ".1f")}</td>'
        f'<td class="n">{num(entry.tissue_mm2, ".2f")}</td><td>{_bar(entry, classes)}</td>'
        f'{cells}<td class="err">{error}</td></tr>')


def _pooled(entries: list[Entry], classes: dict[str, list[int]]) -> dict[str, float]:
    """Class shares of all the tissue of the done slides together (weighted by tissue area)."""
    total = sum(e.tissue_mm2 or 0 for e in entries)
    if total <= 0:
        return {c: 0.0 for c in classes}
    return {c: sum((e.tissue_mm2 or 0) * e.percent.get(c, 0) for e in entries) / total
            for c in classes}


def _chart(entries: list[Entry], classes: dict[str, list[int]]) -> str:
    done = [e for e in entries if e.status == "done" and e.percent]
    if not done or not classes:
        return '<p class="sub">no finished slide yet</p>'
    first = next(iter(classes))
    done.sort(key=lambda e: -e.percent.get(first, 0))
    groups = [done[i * len(done) // MAX_COLUMNS:(i + 1) * len(done) // MAX_COLUMNS]
              for i in range(MAX_COLUMNS)] if len(done) > MAX_COLUMNS else [[e] for e in done]
    rects = []
    for x, group in enumerate(g for g in groups if g):
        y = 0.0
        for name, rgb in classes.items():
            h = sum(e.percent.get(name, 0) for e in group) / len(group)
            if h > 0:
                rects.append(f'<rect x="{x}" y="{y:.3f}" width="1" height="{h:.3f}" '
                             f'fill="{_rgb(rgb)}"/>')
            y += h
    n = sum(1 for g in groups if g)
    pooled = _pooled(done, classes)
    legend = "".join(f'<span class="sw" style="background:{_rgb(rgb)}"></span>'
                     f'{html.escape(name)} {pooled[name]:.1f}%' for name, rgb in classes.items())
    return (f'<svg id="chart" viewBox="0 0 {n} 100" preserveAspectRatio="none" width="100%" '
            f'height="140" role="img" aria-label="class composition per slide">'
            f'{"".join(rects)}</svg><div class="legend">all {len(done)} done slide(s) '
            f'pooled:{legend}</div>')


class ReportPage:
    """The page of one ``OUT``: entries by slide, written by :meth:`write`."""

    def __init__(self, out: Path, min_interval_s: float = 2.0):
        self.out = Path(out)
        self.path = self.out / REPORT
        self.min_interval_s = min_interval_s
        self.entries: dict[str, Entry] = {}
        self.classes: dict[str, list[int]] = {}
        self._rows: dict[str, str] = {}
        self._last = -float("inf")
        self._cost = 0.0
        self.writes = 0
        self.write_s = 0.0

    def set(self, entry: Entry) -> None:
        new = {c: rgb for c, rgb in entry.colors.items() if c not in self.classes}
        for c in entry.percent:
            if c not in self.classes and c not in new:
                new[c] = [128, 128, 128]
        if new:
            self.classes.update(new)
            self._rows.clear()  # the class columns changed: every row again
        self.entries[entry.slide] = entry
        self._rows[entry.slide] = _row(entry, self.classes)

    def html(self) -> str:
        e = html.escape
        for slide, entry in self.entries.items():
            if slide not in self._rows:
                self._rows[slide] = _row(entry, self.classes)
        counts: dict[str, int] = {}
        for entry in self.entries.values():
            counts[entry.status] = counts.get(entry.status, 0) + 1
        tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        heads = "".join(f'<th data-key="c{i}">{e(c)} %</th>' for i, c in enumerate(self.classes))
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<link rel="icon" href="data:,"><title>wsiproto cohort: {e(self.out.name)}</title>'
            f'<style>{STYLE}</style></head><body><h1>wsiproto cohort: {e(str(self.out))}</h1>'
            f'<p>{len(self.entries)} slide(s): {e(tally)}; updated {stamp}</p>'
            f'<h2>Class composition across slides</h2>{_chart(list(self.entries.values()), self.classes)}'
            f'<h2>Slides</h2><table id="slides"><thead><tr><th>overlay</th>'
            f'<th data-key="name">slide</th><th data-key="status">status</th>'
            f'<th data-key="duration">duration s</th><th data-key="tissue">tissue mm²</th>'
            f'<th>composition</th>{heads}<th>error</th></tr></thead><tbody>'
            + "".join(self._rows[s] for s in self.entries)
            + f"</tbody></table><script>{SCRIPT}</script></body></html>\n")

    def write(self, force: bool = False) -> bool:
        """Rewrite the page (atomically) unless it was written too recently; True if written."""
        from wsiproto.files import write_text_atomic

        since = time.monotonic() - self._last
        if not force and since < max(self.min_interval_s, 20 * self._cost):
            return False
        t0 = time.perf_counter()
        write_text_atomic(self.path, self.html())
        self._cost = time.perf_counter() - t0
        self._last = time.monotonic()
        self.writes += 1
        self.write_s += self._cost
        return True


__all__ = ["Entry", "ReportPage", "class_colors", "entry_from_row", "thumbnail_uri"]
