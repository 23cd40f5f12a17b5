"""Regions of interest from QuPath GeoJSON exports: layouts, classes, holes, checks, masks."""

from __future__ import annotations

import gzip
import json
import logging
import time

import numpy as np
import pytest
import shapely
from shapely.geometry import mapping

from wsiproto.errors import WsiprotoError
from wsiproto.slide.roi import load_roi

SLIDE = (4000, 3000)
SQUARE = shapely.Polygon([(100, 100), (1100, 100), (1100, 1100), (100, 1100)],
                         [[(400, 400), (400, 600), (600, 600), (600, 400)]])  # 1e6 - 4e4 px^2
DISK = shapely.Point(2500, 1500).buffer(400, quad_segs=64)


def qupath_feature(geom, name=None, object_type="annotation", legacy=False, **extra) -> dict:
    """A feature as QuPath 0.4/0.5 writes it (or 0.2 with ``legacy``: no objectType, a
    PathAnnotationObject id, the class as a dict with colorRGB)."""
    props: dict = {} if legacy else {"objectType": object_type}
    if name is not None:
        props["classification"] = (
            {"name": name, "colorRGB": -3670016} if legacy else {"name": name, "color": [200, 0, 0]})
    feature = {"type": "Feature", "geometry": mapping(geom), "properties": props, **extra}
    feature["id"] = "PathAnnotationObject" if legacy else "6b0d3e2e-5b3c-4a56-9a0e-1c1f7c5b7f10"
    return feature


def write(tmp_path, obj, name="regions.geojson", gz=False):
    path = tmp_path / name
    data = json.dumps(obj).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("layout", ["collection", "qupath-list", "feature", "polygon",
                                    "multipolygon", "gzip", "legacy-0.2"])
def test_every_export_layout_gives_the_same_region(tmp_path, layout):
    both = shapely.MultiPolygon([SQUARE, DISK])
    obj = {
        "collection": {"type": "FeatureCollection",
                       "features": [qupath_feature(SQUARE, "Tumor"), qupath_feature(DISK)]},
        "qupath-list": [qupath_feature(SQUARE, "Tumor"), qupath_feature(DISK)],
        "feature": qupath_feature(both, "Tumor"),
        "polygon": mapping(SQUARE),
        "multipolygon": mapping(both),
        "gzip": [qupath_feature(both)],
        "legacy-0.2": [qupath_feature(SQUARE, "Tumor", legacy=True),
                       qupath_feature(DISK, legacy=True)],
    }[layout]
    roi = load_roi(write(tmp_path, obj, gz=layout == "gzip"), SLIDE)
    expected = SQUARE.area + DISK.area if layout != "polygon" else SQUARE.area
    assert roi.area_px() == pytest.approx(expected)
    assert roi.bbox[:2] == (100.0, 100.0)


def test_holes_stay_holes_and_overlaps_count_once(tmp_path):
    overlapping = shapely.box(900, 900, 1300, 1300)
    roi = load_roi(write(tmp_path, [qupath_feature(SQUARE), qupath_feature(overlapping)]), SLIDE)
    assert roi.area_px() == pytest.approx(SQUARE.union(overlapping).area)
    m = roi.mask(0, 0, 200, 200, 10.0)  # 10 px per mask pixel
    assert not m[50, 50] and m[20, 20] and m[120, 120] and not m[5, 5]


def test_class_selection_dict_or_legacy_string(tmp_path):
    old_style = qupath_feature(DISK)
    old_style["properties"]["classification"] = "Stroma"  # QuPath before 0.2 wrote a string
    features = [qupath_feature(SQUARE, "Tumor"), old_style,
                qupath_feature(shapely.box(3000, 100, 3100, 200), "Tumor: Positive")]
    path = write(tmp_path, features)
    tumor = load_roi(path, SLIDE, roi_class="Tumor")
    assert tumor.area_px() == pytest.approx(SQUARE.area) and tumor.features == 1
    assert tumor.skipped == {"other class": 2}
    stroma = load_roi(path, SLIDE, roi_class="Stroma")
    assert stroma.area_px() == pytest.approx(DISK.area)
    assert load_roi(path, SLIDE).features == 3


def test_detections_points_and_lines_are_left_out(tmp_path):
    features = [qupath_feature(SQUARE, "Tumor"),
                qupath_feature(shapely.box(2000, 2000, 2010, 2010), "Tumor", "detection"),
                qupath_feature(shapely.box(2100, 2000, 2110, 2010), None, "cell"),
                qupath_feature(shapely.Point(3000, 2000)),
                qupath_feature(shapely.LineString([(0, 0), (50, 50)]))]
    legacy_cell = qupath_feature(DISK, legacy=True)
    legacy_cell["id"] = "PathCellObject"
    roi = load_roi(write(tmp_path, [*features, legacy_cell]), SLIDE)
    assert roi.area_px() == pytest.approx(SQUARE.area)
    assert roi.skipped == {"detection": 1, "cell": 2, "not an area": 2}
    d = roi.describe(mpp=0.5)
    assert d["features"] == 1 and d["area_mm2"] == pytest.approx(SQUARE.area * 0.25 / 1e6)


def test_self_intersection_is_repaired_with_a_warning(tmp_path, caplog):
    bowtie = {"type": "Polygon",
              "coordinates": [[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]}
    feature = {"type": "Feature", "geometry": bowtie, "properties": {"objectType": "annotation"}}
    with caplog.at_level(logging.WARNING, logger="wsiproto.slide.roi"):
        roi = load_roi(write(tmp_path, [feature]), SLIDE)
    assert roi.geometry.is_valid and roi.repaired == 1
    assert roi.area_px() == pytest.approx(5000)  # the two triangles QuPath shows filled
    assert len(caplog.records) == 1 and "regions.geojson" in caplog.records[0].getMessage()


def one_line_error(path, match, **kw):
    with pytest.raises(WsiprotoError, match=match) as err:
        load_roi(path, SLIDE, **kw)
    text = str(err.value)
    assert str(path) in text and "\n" not in text
    return text


def test_errors_are_one_line_naming_the_file(tmp_path):
    open_ring = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10]]]}
    one_line_error(write(tmp_path, {"type": "Feature", "geometry": open_ring, "properties": {}},
                         "open.geojson"), "invalid GeoJSON geometry .*end where it started")
    one_line_error(write(tmp_path, [qupath_feature(SQUARE, "Tumor")], "wrong.geojson"),
                   r"no area annotation of class 'tumor'.*Tumor \(1\)", roi_class="tumor")
    one_line_error(write(tmp_path, [qupath_feature(shapely.Point(5, 5))], "points.geojson"),
                   "no area annotation .*1 not an area")
    one_line_error(write(tmp_path, [qupath_feature(shapely.box(3900, 2900, 4200, 3100))],
                         "outside.geojson"), "outside the slide: x 3900..4200")
    bad_json = tmp_path / "bad.geojson"
    bad_json.write_text('{"type": "FeatureCollection", "features": [')
    one_line_error(bad_json, "not JSON")
    one_line_error(write(tmp_path, {"type": "Topology"}, "topo.geojson"), "not a GeoJSON region")
    one_line_error(tmp_path / "missing.geojson", "no such region file")


def test_an_edge_within_a_pixel_of_the_slide_is_accepted(tmp_path):
    roi = load_roi(write(tmp_path, mapping(shapely.box(0, -0.5, 4000.8, 3000))), SLIDE)
    assert roi.bbox == (0.0, -0.5, 4000.8, 3000.0)


def random_region(seed: int):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 2 * np.pi, 3000))
    r = 700 + 250 * np.sin(5 * t + seed) + rng.normal(0, 4, t.size)
    outer = shapely.Polygon(np.c_[1200 + r * np.cos(t), 1100 + r * np.sin(t)]).buffer(0)
    holes = shapely.union_all([shapely.Point(1200 + 37.3 * k, 1100.7).buffer(11.1 + k)
                               for k in range(-6, 7)])
    island = shapely.Point(3100.3, 2300.9).buffer(300.2)
    return shapely.union_all([outer.difference(holes), island])


@pytest.mark.parametrize("seed,x0,y0,scale", [(0, 0, 0, 1.0), (1, 0.37, 0.61, 1.0),
                                              (2, 150.2, 90.7, 0.73), (3, -200, -100, 1.7),
                                              (4, 2900, 2100, 0.25)])
def test_mask_is_pixel_centre_containment(tmp_path, seed, x0, y0, scale):
    region = random_region(seed)
    roi = load_roi(write(tmp_path, mapping(region)), SLIDE)
    w, h = 640, 480
    got = roi.mask(x0, y0, w, h, scale)
    yy, xx = np.mgrid[0:h, 0:w]
    want = shapely.contains_xy(region, x0 + (xx + 0.5) * scale, y0 + (yy + 0.5) * scale)
    assert got.shape == (h, w) and got.dtype == bool
    assert (got != want).sum() == 0


def test_mask_of_a_2048_grid_is_fast_and_exact_off_the_boundary(tmp_path):
    region = random_region(7)
    roi = load_roi(write(tmp_path, mapping(region)), SLIDE)
    t0 = time.perf_counter()
    got = roi.mask(0.5, 0.25, 2048, 2048, 1.21)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed  # ~0.03 s here; shapely.contains_xy takes ~1 s
    sample = np.random.default_rng(0).integers(0, 2048, size=(2, 20000))
    want = shapely.contains_xy(region, 0.5 + (sample[1] + 0.5) * 1.21,
                               0.25 + (sample[0] + 0.5) * 1.21)
    assert (got[sample[0], sample[1]] == want).all()
    inside = roi.mask(1150, 1050, 64, 32, 1.0)  # wholly inside: no scanline needed
    outside = roi.mask(3900, 50, 64, 32, 1.0)
    assert inside.all() and not outside.any() and roi.mask(0, 0, 0, 5, 1.0).shape == (5, 0)
