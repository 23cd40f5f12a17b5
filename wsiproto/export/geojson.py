"""QuPath GeoJSON of a class-label map, traced block by block and joined across block seams.

Tracing (:mod:`wsiproto.export.trace`): vectorised numpy, pixel-exact, 4-connected, per class
value != 0. Polygons follow pixel edges exactly and keep holes; two pixels of one class that
touch only at a corner are two objects, inside a block and across seams alike.

Blocks can be traced anywhere (``trace_block``, e.g. inside the chunk tasks of a segmentation
run, while the model works on other tiles): a block's *closed* polygons (their region does not
touch an internal seam) are serialised to GeoJSON text right there; the rest is kept as
*chains* (ring pieces between seam vertices), hole rings and the block's edge pixels. The
writer (``GeoJSONWriter.add_trace``) copies the text to the output and hands the rest to a
:class:`~wsiproto.export.trace.SeamStitcher`, which joins the chains of neighbouring blocks
with the same turn rule as the tracer, so a region crossing seams comes out exactly as if the
map had been traced in one piece (no polygon union). With ``rows_in_order=True`` (blocks
arrive row by row, as ``SlidePyramidWriter.iter_label_chunks`` yields them and as
``segment_slide`` feeds them) each new row lets the rows above be stitched and written, so
memory is bounded by one row of blocks' seam data plus the regions still open at the current
row, never by the number of closed objects on the slide; otherwise everything open waits for
``close``. An open region keeps its ring pieces and the holes found so far until its outer
ring closes: for one region spanning the whole slide (tissue with every island of another
class as a hole) that is proportional to its boundary and holes (measured by
``benchmarks/geojson_export.py``: "held at seams").

Output (QuPath >= 0.4 conventions): a ``FeatureCollection`` written feature by feature to
``<path>.part`` (through gzip for ``.geojson.gz``) and renamed into place by ``close``; an
exception (``with`` block) or ``abort()`` removes the partial file, so nothing ever appears at
the final name unfinished. Each feature::

    {"type": "Feature", "id": "<uuid4>", "geometry": {"type": "Polygon", ...},
     "properties": {"objectType": "annotation" | "detection", "isLocked": false,
                    "classification": {"name": "TUM", "color": [r, g, b]},
                    "measurements": {"Area px^2": ..., "Area µm^2": ..., "Perimeter µm": ...}}}

Coordinates are level-0 pixels of the slide's bounds-cropped frame (label px x ``scale``),
rounded to 0.01 px; geometry is valid (a ring touching itself at a corner goes through
make_valid, polygonal parts only), holes kept, one Polygon per connected region. Areas come
from the exact label-grid polygon (px^2 of level 0, and µm^2 when ``mpp`` is given); the
perimeter counts pixel edges (a staircase, not a smoothed outline). The text is produced the
way ``json.dumps(feature, separators=(",", ":"))`` would write it, from per-coordinate string
tables instead of per-vertex float formatting.
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from wsiproto.errors import WsiprotoError
from wsiproto.export.trace import (
    BlockTrace,
    Rings,
    SeamStitcher,
    ring_area2,
    split_pinches,
    trace_labels,
)

ClassTable = list[tuple[int, str, tuple[int, int, int]]]
OBJECT_TYPES = ("annotation", "detection")


def polygon_parts(geom) -> list[Polygon]:
    """The valid, non-empty Polygons of any geometry (make_valid, polygonal parts only)."""
    if geom is None or geom.is_empty:
        return []
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if geom.geom_type == "Polygon":
        return [geom]
    parts = getattr(geom, "geoms", [])
    return [p for g in parts for p in polygon_parts(g) if p.area > 0]


def _pinched_rings(rings: list[np.ndarray]) -> np.ndarray:
    """For each (unclosed, integer) ring: does it pass through one vertex twice?"""
    sizes = [len(r) for r in rings]
    xy = np.concatenate(rings).astype(np.int64)
    ring = np.repeat(np.arange(len(rings)), sizes)
    keys = np.sort((ring << 42) | (xy[:, 0] << 21) | xy[:, 1])
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    out = np.zeros(len(rings), bool)
    out[keys[dup] >> 42] = True
    return out


class FeatureFormatter:
    """Serialises label-grid polygons as QuPath GeoJSON features (see module doc).

    ``classes``: ``(value, name, (r, g, b))``; ``scale``: level-0 px per label px; ``mpp``:
    level-0 µm per px or None; ``label_shape``: (H, W) of the label map (sizes the coordinate
    string tables, one entry per grid line).
    """

    def __init__(self, classes: ClassTable, scale: float, object_type: str = "annotation",
                 mpp: float | None = None, label_shape: tuple[int, int] = (0, 0)):
        if object_type not in OBJECT_TYPES:
            raise WsiprotoError(f"unknown object type {object_type!r}",
                                hint="use annotation or detection")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.classes = {int(v): (str(n), [int(c) for c in rgb]) for v, n, rgb in classes}
        self.values = sorted(self.classes)
        self.scale = float(scale)
        self.object_type = object_type
        self.mpp = None if mpp is None else float(mpp)
        self.label_shape = (int(label_shape[0]), int(label_shape[1]))
        self._props = {}
        for v, (name, color) in self.classes.items():
            head = json.dumps({"objectType": object_type, "isLocked": False,
                               "classification": {"name": name, "color": color}},
                              separators=(",", ":"))
            self._props[v] = head[:-1] + ',"measurements":'
        self._keys = [json.dumps(k) for k in ("Area px^2", "Area µm^2", "Perimeter µm")]
        # Coordinates are np.round(i * scale, 2), as numpy rounds them. That is strictly
        # increasing in i for scale >= 0.01, so it keeps the
        # order of all coordinates, hence the topology: valid polygons stay valid. Smaller
        # scales go through shapely and make_valid.
        self.exact = self.scale >= 0.01
        H, W = self.label_shape
        self._xs = self._ys = None
        if self.exact:
            xs = np.round(np.arange(W + 1) * self.scale, 2).tolist()
            ys = np.round(np.arange(H + 1) * self.scale, 2).tolist()
            self._xs = np.array(["[" + repr(x) for x in xs], dtype=object)
            self._ys = np.array([repr(y) + "]" for y in ys], dtype=object)

    # ------------------------------------------------------------------ pieces of a feature
    def _measurements(self, area: float, length: float) -> str:
        out = f"{{{self._keys[0]}:{round(area * self.scale ** 2, 4)!r}"
        if self.mpp is not None:
            um = self.scale * self.mpp
            out += (f",{self._keys[1]}:{round(area * um ** 2, 4)!r}"
                    f",{self._keys[2]}:{round(length * um, 4)!r}")
        return out + "}"

    @staticmethod
    def _head() -> str:
        return ('\n{"type":"Feature","id":"' + str(uuid.uuid4())
                + '","geometry":{"type":"Polygon","coordinates":[')

    def _tail(self, value: int, area: float, length: float) -> str:
        return "]}," + '"properties":' + self._props[value] + \
            self._measurements(area, length) + "}}"

    def _slow(self, value: int, rings: list[np.ndarray]) -> list[str]:
        """Features of a polygon through shapely (make_valid; tiny scales)."""
        poly = Polygon(rings[0], rings[1:])
        out = []
        for part in polygon_parts(poly):
            if self.exact:
                geoms = [[np.round(shapely.get_coordinates(r) * self.scale, 2).tolist()
                          for r in (part.exterior, *part.interiors)]]
            else:
                scaled = shapely.transform(part, lambda xy: np.round(xy * self.scale, 2))
                geoms = [mapping(p)["coordinates"] for p in polygon_parts(scaled)]
            for coords in geoms:
                geometry = json.dumps({"type": "Polygon", "coordinates": coords},
                                      separators=(",", ":"))
                out.append(self._head()[: -len('{"type":"Polygon","coordinates":[')]
                           + geometry + "," + '"properties":' + self._props[value]
                           + self._measurements(part.area, part.length) + "}}")
        return out

    # ------------------------------------------------------------------ public
    def feature(self, value: int, rings: list[np.ndarray]) -> list[str]:
        """Feature texts (each starting with a newline) of one polygon: integer label-grid
        rings, unclosed, outer first. Usually one; more when make_valid splits it.

        A ring touching itself at a corner (invalid as it is) is cut there into loops: the
        outer ring's loops are its outer ring and holes touching it at one point, a hole's are
        holes touching each other, which is valid. Anything else goes through make_valid."""
        if not self.exact:
            return self._slow(value, rings)
        pinched = _pinched_rings(rings)
        if pinched.any():
            loops = [lp for r, p in zip(rings, pinched)
                     for lp in (split_pinches(r) if p else [r])]
            shells = [lp for lp in loops if ring_area2(lp) > 0]
            if len(shells) != 1:
                return self._slow(value, rings)
            rings = shells + [lp for lp in loops if ring_area2(lp) < 0]
        sizes = np.array([len(r) for r in rings])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        xy = np.concatenate(rings).astype(np.int64)
        # closed rings: every ring's first vertex again at its end
        closed_sizes = sizes + 1
        offsets = np.concatenate([[0], np.cumsum(closed_sizes)])
        idx = np.repeat(starts - offsets[:-1], closed_sizes) + np.arange(offsets[-1])
        idx[offsets[1:] - 1] = starts
        c = xy[idx]
        dx, dy = np.diff(c[:, 0]), np.diff(c[:, 1])
        inner = np.ones(len(dx), bool)
        inner[offsets[1:-1] - 1] = False  # the step from one ring to the next
        area = float((c[:-1, 0] * c[1:, 1] - c[1:, 0] * c[:-1, 1])[inner].sum()) / 2
        length = float((np.abs(dx) + np.abs(dy))[inner].sum())
        tokens = self._coord_tokens(c, offsets)
        tokens[0] = self._head() + tokens[0]
        tokens[-1] = tokens[-1] + self._tail(value, area, length)
        return [",".join(tokens.tolist())]

    def _coord_tokens(self, xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The text tokens of closed rings' vertices ``xy`` (rings start at ``offsets``):
        ``[x`` and ``y]`` per vertex from the string tables, each ring wrapped in ``[...]``."""
        tokens = np.empty(2 * len(xy), object)
        tokens[0::2] = self._xs[xy[:, 0]]
        tokens[1::2] = self._ys[xy[:, 1]]
        first, last = 2 * offsets[:-1], 2 * offsets[1:] - 1
        tokens[first] = "[" + tokens[first]
        tokens[last] = tokens[last] + "]"
        return tokens

    def polygons(self, rings: Rings) -> tuple[str, dict[int, int]]:
        """Text of many polygons (features joined by ","; each starts with a newline) and the
        number of features per class value."""
        counts: dict[int, int] = {}
        if len(rings) == 0:
            return "", counts
        slow = rings.poly_pinched | (not self.exact)
        texts = []
        if slow.any():
            for i in np.flatnonzero(slow):
                v = int(rings.poly_value[i])
                feats = self.feature(v, rings.polygon_rings(int(i)))
                counts[v] = counts.get(v, 0) + len(feats)
                texts.append(",".join(feats))
        fast = np.flatnonzero(~slow)
        if len(fast):
            keep = np.flatnonzero(~slow[rings.ring_poly])
            starts, ends = rings.ring_start[keep], rings.ring_start[keep + 1]
            sizes = ends - starts + 1  # closed rings: the first vertex again at the end
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            idx = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
            idx[offsets[1:] - 1] = starts
            tokens = self._coord_tokens(rings.coords[idx], offsets)
            first, last = 2 * offsets[:-1], 2 * offsets[1:] - 1
            poly = rings.ring_poly[keep]
            new_poly = np.r_[True, poly[1:] != poly[:-1]]
            p_first = first[new_poly]
            p_last = last[np.r_[new_poly[1:], True]]
            values = rings.poly_value[fast]
            heads = np.array([self._head() for _ in range(len(fast))], dtype=object)
            tails = np.array([self._tail(int(v), float(a), float(le)) for v, a, le in
                              zip(values, rings.poly_area[fast], rings.poly_length[fast])],
                             dtype=object)
            tokens[p_first] = heads + tokens[p_first]
            tokens[p_last] = tokens[p_last] + tails
            texts.append(",".join(tokens.tolist()))
            vals, n = np.unique(values, return_counts=True)
            for v, k in zip(vals.tolist(), n.tolist()):
                counts[v] = counts.get(v, 0) + k
        return ",".join(t for t in texts if t), counts


def trace_block(labels: np.ndarray, y0: int, x0: int, formatter: FeatureFormatter,
                pixel_counts: bool = False, scratch: dict | None = None) -> BlockTrace:
    """Trace one block of labels at label-grid position (y0, x0) of the formatter's map and
    serialise its closed polygons; the result goes to ``GeoJSONWriter.add_trace`` (possibly
    after ``BlockTrace.save``/``load``). Thread-safe (give each thread its own ``scratch``
    dict, where work arrays are kept between calls); meant to run inside chunk tasks."""
    labels = np.ascontiguousarray(labels)
    if labels.dtype != np.uint8:
        labels = labels.astype(np.uint8)
    trace = trace_labels(labels, y0, x0, formatter.values, label_shape=formatter.label_shape,
                         scratch=scratch)
    trace.text, trace.counts = formatter.polygons(trace.closed)
    trace.closed = None
    if pixel_counts:
        trace.pixel_counts = np.bincount(labels.ravel(), minlength=256)
    return trace


class GeoJSONWriter:
    """Streamed, seam-stitching QuPath GeoJSON writer (see module doc).

    ``classes``: ``(value, name, (r, g, b))`` of the label values to export (others are ignored).
    ``scale``: level-0 slide pixels per label pixel. ``mpp``: level-0 µm per pixel, or None for
    pixel measurements only. ``chunk_shape``: the block grid (block origins must lie on it).
    ``label_shape``: (H, W) of the whole label map; block edges on its border are not seams.
    ``rows_in_order``: blocks come row by row (a block of an earlier grid row is then an
    error), so finished rows are stitched and written as the next one starts. Use as a context
    manager, or call ``close`` / ``abort``.
    """

    def __init__(self, path, *, classes: ClassTable, scale: float, object_type: str = "annotation",
                 gzip: bool = False, mpp: float | None = None, chunk_shape: tuple[int, int],
                 label_shape: tuple[int, int], rows_in_order: bool = False):
        self.formatter = FeatureFormatter(classes, scale, object_type, mpp, label_shape)
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.classes = self.formatter.classes
        self.scale = self.formatter.scale
        self.chunk_shape = (int(chunk_shape[0]), int(chunk_shape[1]))
        self.label_shape = self.formatter.label_shape
        self.rows_in_order = bool(rows_in_order)
        self._stitcher = SeamStitcher(self.label_shape, self.chunk_shape, self._emit)
        self._seen: set[tuple[int, int]] = set()
        self._scratch: dict = {}  # tracing work arrays, reused from block to block
        self._counts: dict[str, int] = {n: 0 for n, _ in self.classes.values()}
        self._t0 = time.perf_counter()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(self.part, "wb")  # noqa: SIM115 - held open across calls, closed by close/abort
        self._gz = gzip_module.GzipFile(fileobj=self._raw, mode="wb", filename="", mtime=0) \
            if gzip else None
        self._fh = io.TextIOWrapper(self._gz or self._raw, encoding="utf-8")
        self._fh.write('{"type": "FeatureCollection", "features": [')
        self._first = True

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> GeoJSONWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ input
    def _check_block(self, y0: int, x0: int, shape: tuple[int, ...]) -> None:
        ch, cw = self.chunk_shape
        H, W = self.label_shape
        if len(shape) != 2:
            raise ValueError(f"labels must be 2-D, got shape {shape}")
        if y0 % ch or x0 % cw:
            raise ValueError(f"block origin ({y0}, {x0}) is not on the {ch}x{cw} chunk grid")
        if y0 < 0 or x0 < 0 or y0 + shape[0] > H or x0 + shape[1] > W:
            raise ValueError(f"block ({y0}, {x0}) + {shape} lies outside the {H}x{W} label map")
        if shape[0] != min(ch, H - y0) or shape[1] != min(cw, W - x0):
            raise ValueError(f"block ({y0}, {x0}) has shape {shape}, not a whole grid cell")
        if (y0, x0) in self._seen:
            raise ValueError(f"block ({y0}, {x0}) was already added")
        if self.rows_in_order and y0 // ch < self._stitcher.next_row:
            raise ValueError(f"block ({y0}, {x0}) comes after its row (rows_in_order=True)")
        self._seen.add((y0, x0))

    def add_chunk(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Trace one block of labels (uint8 [h, w]) at label-grid position (y0, x0)."""
        if self._closed:
            raise ValueError("add_chunk after close/abort")
        labels = np.asarray(labels)
        self._check_block(y0, x0, labels.shape)
        self._add(trace_block(labels, y0, x0, self.formatter, scratch=self._scratch))

    def add_trace(self, trace: BlockTrace) -> None:
        """Add a block traced by ``trace_block`` (with this writer's classes, scale, ...)."""
        if self._closed:
            raise ValueError("add_trace after close/abort")
        self._check_block(trace.y0, trace.x0, trace.shape)
        self._add(trace)

    def _add(self, trace: BlockTrace) -> None:
        if self.rows_in_order:
            row = trace.y0 // self.chunk_shape[0]
            while self._stitcher.next_row < row:
                self._stitcher.finish_row()
        if trace.text:
            self._write_text(trace.text)
        for v, n in trace.counts.items():
            self._counts[self.classes[v][0]] += n
        # The stitcher keeps the trace until its row is done: only what it needs (chains,
        # holes, edge strips), not the features already written.
        trace.text, trace.pixel_counts, trace.closed = None, None, None
        self._stitcher.add(trace)

    # ------------------------------------------------------------------ output
    def _write_text(self, text: str) -> None:
        self._fh.write(text if self._first else "," + text)
        self._first = False

    def _emit(self, value: int, rings: list[np.ndarray]) -> None:
        feats = self.formatter.feature(value, rings)
        self._write_text(",".join(feats))
        self._counts[self.classes[value][0]] += len(feats)

    @property
    def held_max(self) -> int:
        """The most chains and holes held at once between rows (memory check)."""
        return self._stitcher.held_max

    def close(self) -> dict:
        """Stitch what is left, finish the file, rename it into place; return stats."""
        if self._closed:
            raise ValueError("GeoJSONWriter already closed")
        try:
            self._scratch.clear()
            self._stitcher.finish()
            self._fh.write("\n]}\n")
            self._fh.flush()
            self._fh.detach()
            if self._gz is not None:
                self._gz.close()  # writes the gzip trailer; leaves the raw file open
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.part, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return {"path": self.path, "features": dict(self._counts),
                "total_features": sum(self._counts.values()),
                "seconds": round(time.perf_counter() - self._t0, 3),
                "bytes": self.path.stat().st_size}

    def abort(self) -> None:
        """Drop everything written so far (removes the ``.part`` file); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._scratch.clear()
        for fh in (self._gz, self._raw):
            try:
                if fh is not None:
                    fh.close()
            except Exception:  # noqa: BLE001, S110 - closing a half-written stream on the way out
                pass
        self.part.unlink(missing_ok=True)


__all__ = ["FeatureFormatter", "GeoJSONWriter", "polygon_parts", "trace_block"]
