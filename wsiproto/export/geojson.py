"""QuPath GeoJSON of a class-label map, traced chunk by chunk and dissolved across chunk seams.

Tracing: ``rasterio.features.shapes`` (GDAL polygonize) on each chunk, 4-connected, per class
value != 0. Its polygons follow pixel edges exactly and keep holes (OpenCV contours run through
pixel centres, shrink regions by half a pixel and can self-intersect). Two pixels of one class
that touch only at a corner are two objects, inside a chunk and across seams alike.

Seams: a polygon that touches an *internal* chunk seam (a chunk edge that is not the border of
the label map) may continue in the neighbouring chunk. Those polygons are held in memory, per
class. Every other polygon is final at once and is written to the output stream straight away.
When blocks arrive row by row (as ``SlidePyramidWriter.iter_label_chunks`` yields them), each
new row first settles the rows above it: held polygons are grouped into connected components
(shells that intersect), and a component that does not reach the new row's top seam can no
longer grow, so it is unioned (``dissolve``) and written. Memory is therefore bounded by the
chunk being traced plus the held polygons of components still open at the current row (regions
crossing that row boundary), never by the number of objects on the slide nor by the number of
rows. Blocks out of row order are accepted too; then everything held waits for ``close``.

Output (QuPath >= 0.4 conventions): a ``FeatureCollection`` written feature by feature to
``<path>.part`` (through gzip for ``.geojson.gz``) and renamed into place by ``close``; an
exception (``with`` block) or ``abort()`` removes the partial file, so nothing ever appears at
the final name unfinished. Each feature::

    {"type": "Feature", "id": "<uuid4>", "geometry": {"type": "Polygon", ...},
     "properties": {"objectType": "annotation" | "detection", "isLocked": false,
                    "classification": {"name": "TUM", "color": [r, g, b]},
                    "measurements": {"Area px^2": ..., "Area µm^2": ..., "Perimeter µm": ...}}}

Coordinates are level-0 pixels of the slide's bounds-cropped frame (label px x ``scale``),
rounded to 0.01 px; geometry is made valid (polygonal parts only), holes kept, one Polygon per
connected region. Areas come from the exact label-grid polygon (px^2 of level 0, and µm^2 when
``mpp`` is given); the perimeter counts pixel edges (a staircase, not a smoothed outline).
"""

from __future__ import annotations

import gzip as gzip_module
import io
import json
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon, mapping

from wsiproto.errors import WsiprotoError

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


def _drop_collinear(ring) -> np.ndarray:
    """A closed rectilinear ring without the vertices in the middle of straight runs (GDAL puts
    one at every pixel corner); the geometry is unchanged."""
    pts = np.asarray(ring, dtype=np.float64)[:-1]
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    straight = ((prev[:, 0] == pts[:, 0]) & (pts[:, 0] == nxt[:, 0])) | \
        ((prev[:, 1] == pts[:, 1]) & (pts[:, 1] == nxt[:, 1]))
    pts = pts[~straight]
    return np.concatenate([pts, pts[:1]])


def trace_block(labels: np.ndarray, y0: int, x0: int, values) -> list[tuple[int, Polygon]]:
    """Pixel-exact polygons ``(value, polygon)`` of the given class values in one block.

    Coordinates are label-grid pixels of the whole map: (x0 + column, y0 + row) of pixel corners.
    """
    from affine import Affine
    from rasterio.features import shapes

    mask = np.isin(labels, list(values))
    if not mask.any():
        return []
    transform = Affine(1.0, 0.0, float(x0), 0.0, 1.0, float(y0))
    geoms, vals = [], []
    for geom, value in shapes(labels, mask=mask, connectivity=4, transform=transform):
        rings = [_drop_collinear(r) for r in geom["coordinates"]]
        geoms.append(Polygon(rings[0], rings[1:]))
        vals.append(int(value))
    valid = shapely.is_valid(np.asarray(geoms, dtype=object))
    out = []
    for value, poly, ok in zip(vals, geoms, valid):
        # A region touching itself at a pixel corner can come out as an invalid ring.
        parts = [poly] if ok else polygon_parts(poly)
        out.extend((value, part) for part in parts)
    return out


def dissolve(polys: list[Polygon]) -> list[Polygon]:
    """Union polygons of one class traced in different chunks; one Polygon per connected part.

    The union runs on the filled shells only, and the holes are put back afterwards: a hole of a
    traced polygon never touches its chunk's edge (there it would be a bay), so the union cannot
    change it, and no other held polygon of the class lies inside it (that one would not touch a
    seam either). Unions of shells are much cheaper than unions of polygons with thousands of
    holes (lymphocytes in stroma). GEOS overlay output is valid, so parts are not re-checked.
    """
    if not polys:
        return []
    holes = [Polygon(ring) for p in polys for ring in p.interiors]
    merged = shapely.unary_union([Polygon(p.exterior) for p in polys])
    parts = list(getattr(merged, "geoms", [merged]))
    parts = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    if holes:
        tree = shapely.STRtree(holes)
        hole_idx, part_idx = tree.query(parts, predicate="contains")[::-1]
        by_part: dict[int, list] = defaultdict(list)
        for h, p in zip(hole_idx.tolist(), part_idx.tolist()):
            by_part[p].append(holes[h].exterior)
        parts = [Polygon(p.exterior, list(p.interiors) + by_part.get(i, []))
                 for i, p in enumerate(parts)]
    return [shapely.simplify(p, 0) for p in parts]


def _components(polys: list[Polygon]) -> list[list[int]]:
    """Indices of ``polys`` grouped by connectivity of their shells (touching counts)."""
    shells = [Polygon(p.exterior) for p in polys]
    parent = list(range(len(polys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left, right = shapely.STRtree(shells).query(shells, predicate="intersects")
    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(polys)):
        groups[find(i)].append(i)
    return list(groups.values())


class GeoJSONWriter:
    """Streamed, seam-dissolving QuPath GeoJSON writer (see module doc).

    ``classes``: ``(value, name, (r, g, b))`` of the label values to export (others are ignored).
    ``scale``: level-0 slide pixels per label pixel. ``mpp``: level-0 µm per pixel, or None for
    pixel measurements only. ``chunk_shape``: the label grid the blocks are cut from (block
    origins must lie on it). ``label_shape``: (H, W) of the whole label map; block edges on its
    border are not seams. Use as a context manager, or call ``close`` / ``abort``.
    """

    def __init__(self, path, *, classes: ClassTable, scale: float, object_type: str = "annotation",
                 gzip: bool = False, mpp: float | None = None, chunk_shape: tuple[int, int],
                 label_shape: tuple[int, int]):
        if object_type not in OBJECT_TYPES:
            raise WsiprotoError(f"unknown object type {object_type!r}",
                                hint="use annotation or detection")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.classes = {int(v): (str(n), [int(c) for c in rgb]) for v, n, rgb in classes}
        self.scale = float(scale)
        self.object_type = object_type
        self.mpp = None if mpp is None else float(mpp)
        self.chunk_shape = (int(chunk_shape[0]), int(chunk_shape[1]))
        self.label_shape = (int(label_shape[0]), int(label_shape[1]))
        self._held: dict[int, list[Polygon]] = defaultdict(list)
        self._row_y0 = 0  # top of the block row being traced
        self._row_order = True  # blocks so far came row by row
        self._seen: set[tuple[int, int]] = set()
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
        if (y0, x0) in self._seen:
            raise ValueError(f"block ({y0}, {x0}) was already added")
        self._seen.add((y0, x0))

    def _touches_seam(self, poly: Polygon, y0: int, x0: int, h: int, w: int) -> bool:
        H, W = self.label_shape
        minx, miny, maxx, maxy = poly.bounds
        return ((miny <= y0 and y0 > 0) or (maxy >= y0 + h and y0 + h < H)
                or (minx <= x0 and x0 > 0) or (maxx >= x0 + w and x0 + w < W))

    def add_chunk(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Trace one block of labels (uint8 [h, w]) at label-grid position (y0, x0)."""
        if self._closed:
            raise ValueError("add_chunk after close/abort")
        labels = np.ascontiguousarray(labels)
        self._check_block(y0, x0, labels.shape)
        if labels.dtype != np.uint8:
            labels = labels.astype(np.uint8)
        h, w = labels.shape
        if y0 < self._row_y0:
            self._row_order = False  # a block above the current row: settle nothing early
        elif y0 > self._row_y0:
            if self._row_order:
                self._settle_above(y0)
            self._row_y0 = y0
        for value, poly in trace_block(labels, y0, x0, self.classes):
            if self._touches_seam(poly, y0, x0, h, w):
                self._held[value].append(poly)
            else:
                self._write_feature(value, poly)

    # ------------------------------------------------------------------ output
    def _measurements(self, poly: Polygon) -> dict:
        area_px = poly.area * self.scale**2
        out = {"Area px^2": round(area_px, 4)}
        if self.mpp is not None:
            um = self.scale * self.mpp
            out["Area µm^2"] = round(poly.area * um**2, 4)
            out["Perimeter µm"] = round(poly.length * um, 4)
        return out

    def _geometry(self, poly: Polygon) -> list[dict]:
        """GeoJSON Polygon dicts of a label-grid polygon in level-0 px, rounded to 0.01.

        Our polygons are rectilinear with integer vertices. ``round(i * scale, 2)`` is strictly
        increasing in ``i`` for scale >= 0.01, so it keeps the order of all x and of all y
        coordinates, hence the topology: a valid input stays valid and needs no (costly) check.
        Smaller scales go through make_valid. Coordinates are built with numpy, not per vertex.
        """
        if self.scale < 0.01:
            scaled = shapely.transform(poly, lambda xy: np.round(xy * self.scale, 2))
            return [mapping(p) for p in polygon_parts(scaled)]
        rings = [poly.exterior, *poly.interiors]
        coords = [np.round(shapely.get_coordinates(r) * self.scale, 2).tolist() for r in rings]
        return [{"type": "Polygon", "coordinates": coords}]

    def _write_feature(self, value: int, poly: Polygon) -> None:
        name, color = self.classes[value]
        props = {"objectType": self.object_type, "isLocked": False,
                 "classification": {"name": name, "color": color},
                 "measurements": self._measurements(poly)}
        for geometry in self._geometry(poly):
            feature = {"type": "Feature", "id": str(uuid.uuid4()),
                       "geometry": geometry, "properties": props}
            self._fh.write(("\n" if self._first else ",\n")
                           + json.dumps(feature, separators=(",", ":")))
            self._first = False
            self._counts[name] += 1

    def _settle_above(self, y_seam: int) -> None:
        """Write the held components that end above the seam at ``y_seam`` (they cannot grow).

        Components are found on the traced polygons themselves (never on earlier unions), so
        ``dissolve``'s hole rule stays exact.
        """
        for value in list(self._held):
            polys = self._held[value]
            if not polys:
                continue
            keep = []
            for component in _components(polys):
                if max(polys[i].bounds[3] for i in component) < y_seam:
                    for part in dissolve([polys[i] for i in component]):
                        self._write_feature(value, part)
                else:
                    keep.extend(polys[i] for i in component)
            self._held[value] = keep

    def _dissolve(self) -> None:
        """Union the held seam-touching polygons per class and write their connected parts."""
        for value in sorted(self._held):
            for part in dissolve(self._held.pop(value)):
                self._write_feature(value, part)

    def close(self) -> dict:
        """Dissolve across seams, finish the file, rename it into place; return stats."""
        if self._closed:
            raise ValueError("GeoJSONWriter already closed")
        try:
            self._dissolve()
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
        self._held.clear()
        for fh in (self._gz, self._raw):
            try:
                if fh is not None:
                    fh.close()
            except Exception:  # noqa: BLE001, S110 - closing a half-written stream on the way out
                pass
        self.part.unlink(missing_ok=True)


__all__ = ["GeoJSONWriter", "dissolve", "polygon_parts", "trace_block"]
