"""Regions of interest drawn in QuPath (its GeoJSON export), as one shapely geometry.

Accepted: a FeatureCollection, a Feature, a bare Polygon / MultiPolygon / GeometryCollection, or
the JSON array of features QuPath's "Export objects as GeoJSON" writes by default; ``.gz`` too.
Coordinates are QuPath's level-0 pixels of the image, which is wsiproto's bounds-cropped frame.

What is kept: annotations (``properties.objectType == "annotation"``, or QuPath 0.2's
``"id": "PathAnnotationObject"``, or features that say neither, as other tools write them);
detections, cells, tiles and TMA cores are left out (an export of "all objects" would otherwise
make every cell a region), as are points and lines (no area). ``roi_class`` keeps the features
whose ``properties.classification.name`` equals it (``classification`` as a plain string, as
older QuPath versions write it, is accepted too). The kept areas are united: overlapping
annotations count once, holes stay holes.

Checks, one line each naming the file: not JSON / not GeoJSON; a geometry the ``geojson``
package finds invalid (a ring not closed, fewer than 4 positions); nothing left after the
selection (the classes present are named); coordinates outside the slide (more than 1 px: an
annotation drawn on another slide or exported in another frame). A polygon that is valid
GeoJSON but not a valid area (a self-intersecting outline, as QuPath's polygon tool can draw)
is repaired with ``shapely.make_valid`` and a warning: what QuPath shows filled is what the
repair keeps (a bow-tie becomes its two lobes), so refusing it would only send the user back to
QuPath to do the same by hand.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

OUTSIDE_TOLERANCE_PX = 1.0
_SKIPPED_TYPES = {"detection", "cell", "tile", "tma_core", "tmacore"}
_QUPATH_02_IDS = {"PathDetectionObject": "detection", "PathCellObject": "cell",
                  "PathTileObject": "tile", "TMACoreObject": "tma_core"}


@dataclass
class Roi:
    """A region of interest: ``geometry`` (a valid shapely Polygon or MultiPolygon) in level-0
    pixels of the slide's bounds-cropped frame."""

    geometry: Any
    path: str
    roi_class: str | None = None
    features: int = 0
    repaired: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import shapely

        shapely.prepare(self.geometry)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) in level-0 pixels."""
        return tuple(float(v) for v in self.geometry.bounds)

    def area_px(self) -> float:
        """Area in level-0 pixels squared."""
        return float(self.geometry.area)

    def describe(self, mpp: float | None = None) -> dict:
        """What a summary records: the file, the class, features kept / left out / repaired,
        area (and in mm^2 with the slide's ``mpp``) and bounding box."""
        out = {"file": self.path, "class": self.roi_class, "features": self.features,
               "skipped": dict(self.skipped), "repaired": self.repaired,
               "area_px": round(self.area_px(), 2), "bbox": [round(v, 2) for v in self.bbox]}
        if mpp is not None:
            out["area_mm2"] = round(self.area_px() * mpp * mpp / 1e6, 6)
        return out

    def mask(self, x0: float, y0: float, width: int, height: int, scale: float) -> np.ndarray:
        """bool [height, width]: pixel (i, j) covers level-0 [x0 + j*scale, x0 + (j+1)*scale) x
        [y0 + i*scale, ...) and is True when its centre lies inside the region."""
        import shapely

        out = np.zeros((int(height), int(width)), bool)
        if out.size == 0:
            return out
        x1, y1 = x0 + width * scale, y0 + height * scale
        box = shapely.box(x0, y0, x1, y1)
        if not self.geometry.intersects(box):
            return out
        if self.geometry.contains(box):
            out[:] = True
            return out
        part = shapely.clip_by_rect(self.geometry, x0 - scale, y0 - scale, x1 + scale, y1 + scale)
        return scanline_fill(part, x0, y0, int(width), int(height), float(scale))


def scanline_fill(geometry, x0: float, y0: float, width: int, height: int,
                  scale: float) -> np.ndarray:
    """Even-odd fill of a valid (multi)polygon at pixel centres, all rows at once: each ring
    edge flips the parity of the pixels right of where it crosses a row's centre line."""
    import shapely

    rings = shapely.get_rings(shapely.get_parts(geometry))
    if len(rings) == 0:
        return np.zeros((height, width), bool)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    same = ring_of[1:] == ring_of[:-1]  # consecutive points of one ring form an edge
    xa, ya, xb, yb = coords[:-1, 0][same], coords[:-1, 1][same], coords[1:, 0][same], coords[1:, 1][same]
    ymin, ymax = np.minimum(ya, yb), np.maximum(ya, yb)
    # Rows whose centre y0 + (i + 0.5) * scale lies in [ymin, ymax): a half-open span.
    lo = np.clip(np.ceil((ymin - y0) / scale - 0.5), 0, height).astype(np.int64)
    hi = np.clip(np.ceil((ymax - y0) / scale - 0.5), 0, height).astype(np.int64)
    spans = np.maximum(hi - lo, 0)
    edge = np.repeat(np.arange(spans.size), spans)
    row = lo[edge] + np.arange(edge.size) - np.repeat(np.cumsum(spans) - spans, spans)
    yc = y0 + (row + 0.5) * scale
    xc = xa[edge] + (yc - ya[edge]) * (xb[edge] - xa[edge]) / (yb[edge] - ya[edge])
    # First column whose centre lies right of the crossing (width: none does).
    col = np.clip(np.floor((xc - x0) / scale - 0.5) + 1, 0, width).astype(np.int64)
    flips = np.bincount(row * (width + 1) + col, minlength=height * (width + 1))
    parity = np.cumsum(flips.astype(np.uint8).reshape(height, width + 1), axis=1, dtype=np.uint8)
    return (parity[:, :width] & 1).astype(bool)


# -- loading ------------------------------------------------------------------------------------
def load_roi(path: str | os.PathLike, slide_size: tuple[int, int],
             roi_class: str | None = None) -> Roi:
    """The region of interest in a QuPath GeoJSON export, checked against a slide of
    ``slide_size`` (width, height) level-0 px (bounds-cropped); see the module's docstring."""
    p = Path(path).expanduser()
    shown = str(p)
    features = _features(_parse(p, shown), shown)
    kept, skipped, classes = _select(features, roi_class)
    if not kept:
        raise _empty(shown, roi_class, skipped, classes)
    geometry, repaired = _geometry(kept, shown)
    if geometry.is_empty or geometry.area <= 0:
        raise WsiprotoError("the selected annotations have no area", path=shown,
                            hint="draw the region as an area annotation in QuPath")
    _check_inside(geometry, slide_size, shown)
    return Roi(geometry, shown, roi_class, len(kept), repaired, dict(skipped))


def _parse(p: Path, shown: str) -> Any:
    import geojson

    if not p.is_file():
        raise WsiprotoError("no such region file", path=shown,
                            hint="give the GeoJSON that QuPath exported (File > Export objects "
                                 "as GeoJSON)")
    try:
        raw = p.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8-sig")
        return geojson.loads(text)
    except json.JSONDecodeError as exc:
        raise WsiprotoError(f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                            path=shown, hint="export the regions again from QuPath") from None
    except (ValueError, TypeError, OSError, EOFError) as exc:
        raise WsiprotoError(f"not readable GeoJSON ({' '.join(str(exc).split())})", path=shown,
                            hint="export the regions again from QuPath") from None


def _features(obj: Any, shown: str) -> list:
    """The features of any accepted layout, each a geojson.Feature, checked by the package."""
    import geojson

    if isinstance(obj, geojson.FeatureCollection):
        items = list(obj["features"])
    elif isinstance(obj, list):
        items = obj
    elif isinstance(obj, (geojson.Feature, geojson.geometry.Geometry, geojson.GeometryCollection)):
        items = [obj]
    else:
        items = None
    if items is None or not all(isinstance(f, (geojson.Feature, geojson.geometry.Geometry,
                                               geojson.GeometryCollection)) for f in items):
        raise WsiprotoError(
            "not a GeoJSON region (expected a FeatureCollection, Feature, Polygon / "
            "MultiPolygon, or QuPath's list of features)", path=shown,
            hint="export the regions from QuPath with File > Export objects as GeoJSON")
    return [f if isinstance(f, geojson.Feature) else geojson.Feature(geometry=f) for f in items]


def _object_type(feature) -> str:
    props = feature.get("properties") or {}
    kind = props.get("objectType") or _QUPATH_02_IDS.get(str(feature.get("id")), "annotation")
    return str(kind).lower()


def _class_name(feature) -> str | None:
    c = (feature.get("properties") or {}).get("classification")
    if isinstance(c, dict):
        return None if c.get("name") is None else str(c["name"])
    return None if c is None else str(c)


def _select(features: list, roi_class: str | None) -> tuple[list, Counter, Counter]:
    """(kept features, why others were left out, classes seen among the annotations)."""
    kept, skipped, classes = [], Counter(), Counter()
    for feature in features:
        kind, geom = _object_type(feature), feature.get("geometry")
        if kind in _SKIPPED_TYPES:
            skipped[kind] += 1
            continue
        if geom is None or geom.get("type") not in (
                "Polygon", "MultiPolygon", "GeometryCollection"):
            skipped["not an area"] += 1
            continue
        name = _class_name(feature)
        classes[name or "(unclassified)"] += 1
        if roi_class is not None and name != roi_class:
            skipped["other class"] += 1
            continue
        kept.append(feature)
    return kept, skipped, classes


def _empty(shown: str, roi_class: str | None, skipped: Counter, classes: Counter) -> WsiprotoError:
    what = "no area annotation" + (f" of class {roi_class!r}" if roi_class else "")
    seen = ", ".join(f"{k} ({v})" for k, v in sorted(classes.items())) or "none"
    left = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    if roi_class:
        hint = f"annotation classes in the file: {seen}; check --roi-class (case matters)"
    elif classes:
        hint = f"annotation classes in the file: {seen}"
    else:
        hint = ("draw the region as an area annotation in QuPath and export it with "
                "File > Export objects as GeoJSON")
    return WsiprotoError(f"{what}{f' (left out: {left})' if left else ''}", path=shown,
                         hint=hint)


def _geometry(features: list, shown: str) -> tuple[Any, int]:
    """The union of the features' polygonal parts, repairing invalid areas; (geometry, number
    of features repaired)."""
    import shapely
    from shapely.geometry import shape

    parts, repaired = [], 0
    for i, feature in enumerate(features):
        if not feature.is_valid:
            errors = feature.errors()
            detail = "; ".join(map(str, errors)) if isinstance(errors, list) else str(errors)
            raise WsiprotoError(f"feature {i + 1}: invalid GeoJSON geometry ({detail})",
                                path=shown, hint="fix or delete that annotation in QuPath and "
                                                 "export again")
        geom = shape(feature["geometry"])
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
            repaired += 1
        parts.extend(g for g in shapely.get_parts(geom)
                     if g.geom_type in ("Polygon", "MultiPolygon") and g.area > 0)
    if repaired:
        log.warning("%s: %d self-intersecting annotation(s) repaired (shapely.make_valid: "
                    "each crossing splits the outline into the parts QuPath shows filled)",
                    shown, repaired)
    return shapely.union_all(parts) if parts else shapely.Polygon(), repaired


def _check_inside(geometry, slide_size: tuple[int, int], shown: str) -> None:
    w, h = slide_size
    minx, miny, maxx, maxy = geometry.bounds
    tol = OUTSIDE_TOLERANCE_PX
    if minx < -tol or miny < -tol or maxx > w + tol or maxy > h + tol:
        raise WsiprotoError(
            f"regions reach outside the slide: x {minx:.0f}..{maxx:.0f}, y {miny:.0f}..{maxy:.0f} "
            f"px, the slide is {w} x {h} px", path=shown,
            hint="export the annotations of this slide from QuPath (level-0 pixels), not "
                 "another slide's")
