"""QuPath GeoJSON writer: chunk-wise tracing, seam dissolve, exact areas, atomic streamed output."""

from __future__ import annotations

import gzip
import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import box, shape
from shapely.ops import unary_union

from wsiproto.export.geojson import GeoJSONWriter

CHUNK = 64
CLASSES = [(1, "TUM", (200, 0, 0)), (2, "STR", (0, 160, 0)), (3, "LYM", (0, 0, 200))]
NAMES = {v: n for v, n, _ in CLASSES}
COLORS = {n: c for _, n, c in CLASSES}


def label_map() -> np.ndarray:
    """200x180 map, chunks of 64: a class-1 ring across 4 chunks, blobs, diagonals, border."""
    lab = np.zeros((200, 180), np.uint8)
    lab[40:100, 30:110] = 1          # crosses seams x=64 and y=64: four chunks
    lab[55:75, 50:80] = 0            # its hole, itself across both seams
    lab[60:65, 60:66] = 1            # an island inside the hole (separate object)
    lab[80:90, 85:95] = 0            # a second hole, inside one chunk of the seam region
    lab[130:140, 10:20] = 2          # two separate class-2 blobs
    lab[150:160, 100:115] = 2
    lab[5, 150] = lab[6, 151] = lab[7, 152] = 3   # diagonal-only contacts: three objects
    lab[63, 140] = lab[64, 141] = 3  # diagonal contact across the y=64 seam
    lab[190:200, 0:40] = 3           # touches the outer border (bottom/left), not a seam
    lab[128:132, 170:180] = 1        # on the right border and the y=128 seam
    return lab


def write(path, lab, *, scale=1.0, mpp=0.25, gz=False, chunk=CHUNK, classes=CLASSES):
    with GeoJSONWriter(path, classes=classes, scale=scale, mpp=mpp, gzip=gz,
                       chunk_shape=(chunk, chunk), label_shape=lab.shape) as gj:
        for y0 in range(0, lab.shape[0], chunk):
            for x0 in range(0, lab.shape[1], chunk):
                block = lab[y0 : y0 + chunk, x0 : x0 + chunk]
                if block.any():
                    gj.add_chunk(y0, x0, block)
        stats = gj.close()
    return stats


def truth(lab: np.ndarray, value: int, scale: float = 1.0):
    ys, xs = np.nonzero(lab == value)
    return unary_union([box(x * scale, y * scale, (x + 1) * scale, (y + 1) * scale)
                        for y, x in zip(ys, xs)])


def load(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def by_class(data):
    out: dict[str, list] = {}
    for f in data["features"]:
        out.setdefault(f["properties"]["classification"]["name"], []).append(f)
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    lab = label_map()
    path = tmp_path_factory.mktemp("gj") / "slide.geojson"
    stats = write(path, lab)
    return lab, path, stats, load(path)


def test_feature_format_follows_qupath(result):
    _, path, stats, data = result
    assert data["type"] == "FeatureCollection"
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i).version == 4 for i in ids)
    for f in data["features"]:
        p = f["properties"]
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert p["objectType"] == "annotation"
        assert p["classification"]["color"] == list(COLORS[p["classification"]["name"]])
        assert isinstance(p["measurements"], dict) and "Area µm^2" in p["measurements"]
    assert stats["total_features"] == len(ids) and stats["bytes"] == path.stat().st_size
    assert not path.with_name(path.name + ".part").exists()


def test_union_per_class_equals_rasterised_truth(result):
    lab, _, _, data = result
    groups = by_class(data)
    for value, name in NAMES.items():
        geoms = [shape(f["geometry"]) for f in groups[name]]
        assert all(g.is_valid for g in geoms)
        union = unary_union(geoms)
        expect = truth(lab, value)
        assert union.area == (lab == value).sum()
        assert union.symmetric_difference(expect).area == 0


def test_region_across_four_chunks_is_one_polygon_with_its_hole(result):
    _, _, _, data = result
    tum = [f for f in by_class(data)["TUM"]]
    big = max(tum, key=lambda f: shape(f["geometry"]).area)
    geom = shape(big["geometry"])
    assert geom.bounds == (30, 40, 110, 100)
    assert len(geom.interiors) == 2
    ring_px = 60 * 80 - 20 * 30 - 10 * 10
    assert geom.area == ring_px
    m = big["properties"]["measurements"]
    assert m["Area px^2"] == ring_px and m["Area µm^2"] == pytest.approx(ring_px * 0.0625)
    # island in the hole + the region on the right border across the y=128 seam
    assert len(tum) == 3


def test_separate_blobs_diagonals_and_border(result):
    _, _, stats, data = result
    groups = by_class(data)
    assert len(groups["STR"]) == 2
    lym = sorted(shape(f["geometry"]).area for f in groups["LYM"])
    assert lym == [1, 1, 1, 1, 1, 400]   # diagonal pixels stay apart, also across a seam
    assert stats["features"] == {"TUM": 3, "STR": 2, "LYM": 6}


def test_scale_and_rounding(tmp_path):
    lab = label_map()
    scale = 1.337
    path = tmp_path / "scaled.geojson"
    write(path, lab, scale=scale, mpp=0.2)
    data = load(path)
    for f in data["features"]:
        for ring in f["geometry"]["coordinates"]:
            for x, y in ring:
                assert round(x, 2) == x and round(y, 2) == y
    tum = max((f for f in by_class(data)["TUM"]), key=lambda f: shape(f["geometry"]).area)
    minx, miny, maxx, maxy = shape(tum["geometry"]).bounds
    assert (minx, miny, maxx, maxy) == (round(30 * scale, 2), round(40 * scale, 2),
                                        round(110 * scale, 2), round(100 * scale, 2))
    ring_px = 60 * 80 - 20 * 30 - 10 * 10
    m = tum["properties"]["measurements"]
    assert m["Area px^2"] == pytest.approx(ring_px * scale**2, abs=1e-3)
    assert m["Area µm^2"] == pytest.approx(ring_px * (scale * 0.2) ** 2, abs=1e-3)
    union = unary_union([shape(f["geometry"]) for f in by_class(data)["STR"]])
    rounded_truth = shapely.transform(truth(lab, 2), lambda xy: np.round(xy * scale, 2))
    assert union.symmetric_difference(rounded_truth).area == pytest.approx(0, abs=1e-9)


def test_gzip_round_trip_and_detections(tmp_path):
    lab = label_map()
    path = tmp_path / "slide.geojson.gz"
    with GeoJSONWriter(path, classes=CLASSES, scale=2.0, object_type="detection",
                       gzip=True, chunk_shape=(CHUNK, CHUNK), label_shape=lab.shape) as gj:
        gj.add_chunk(0, 0, lab[:64, :64])
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    assert data["features"]
    assert {f["properties"]["objectType"] for f in data["features"]} == {"detection"}
    assert "Area µm^2" not in data["features"][0]["properties"]["measurements"]


def test_empty_map_gives_empty_collection(tmp_path):
    path = tmp_path / "empty.geojson"
    stats = write(path, np.zeros((100, 100), np.uint8))
    assert load(path) == {"type": "FeatureCollection", "features": []}
    assert stats["total_features"] == 0


def test_unfinished_writer_leaves_nothing(tmp_path):
    path = tmp_path / "broken.geojson"
    lab = label_map()
    with pytest.raises(RuntimeError, match="boom"), \
            GeoJSONWriter(path, classes=CLASSES, scale=1.0, chunk_shape=(CHUNK, CHUNK),
                          label_shape=lab.shape) as gj:
        gj.add_chunk(0, 0, lab[:64, :64])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    gj2 = GeoJSONWriter(path, classes=CLASSES, scale=1.0, chunk_shape=(CHUNK, CHUNK),
                        label_shape=lab.shape)
    gj2.add_chunk(0, 0, lab[:64, :64])
    assert not path.exists()
    gj2.abort()
    assert list(tmp_path.iterdir()) == []


def test_bad_blocks_are_refused(tmp_path):
    lab = label_map()
    with GeoJSONWriter(tmp_path / "x.geojson", classes=CLASSES, scale=1.0,
                       chunk_shape=(CHUNK, CHUNK), label_shape=lab.shape) as gj:
        gj.add_chunk(0, 0, lab[:64, :64])
        with pytest.raises(ValueError, match="already added"):
            gj.add_chunk(0, 0, lab[:64, :64])
        with pytest.raises(ValueError, match="chunk grid"):
            gj.add_chunk(10, 0, lab[10:74, :64])
        with pytest.raises(ValueError, match="outside"):
            gj.add_chunk(192, 128, np.zeros((64, 64), np.uint8))


def test_polygons_are_valid_after_make_valid():
    from wsiproto.export.geojson import polygon_parts

    bowtie = shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])
    parts = polygon_parts(bowtie)
    assert len(parts) == 2 and all(p.is_valid and p.geom_type == "Polygon" for p in parts)


@pytest.mark.parametrize("row_order", [True, False])
def test_components_match_connected_regions_whatever_the_block_order(tmp_path, row_order):
    """Random blobs, rings with islands across seams: one feature per 4-connected region and
    the exact area, whether components are settled row by row or all at close()."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    noise = ndi.gaussian_filter(rng.random((700, 650)), 9)
    labels = np.digitize(noise, np.quantile(noise, [0.35, 0.6, 0.8])).astype(np.uint8)
    yy, xx = np.mgrid[0:700, 0:650]
    r2 = (yy - 350) ** 2 + (xx - 330) ** 2
    labels[(r2 < 150**2) & (r2 >= 100**2)] = 1  # a ring crossing four 128-px chunks
    labels[r2 < 100**2] = 0
    labels[r2 < 40**2] = 1  # an island inside the ring's hole, on a seam too
    classes = [(1, "A", (255, 0, 0)), (2, "B", (0, 255, 0)), (3, "C", (0, 0, 255))]
    path = tmp_path / "blobs.geojson"
    writer = GeoJSONWriter(path, classes=classes, scale=1.0, chunk_shape=(128, 128),
                           label_shape=labels.shape)
    origins = [(y, x) for y in range(0, 700, 128) for x in range(0, 650, 128)]
    if not row_order:
        origins = origins[::-1]
    for y, x in origins:
        writer.add_chunk(y, x, labels[y : y + 128, x : x + 128])
    writer.close()
    feats = json.loads(path.read_text())["features"]
    for value, name, _ in classes:
        geoms = [shape(f["geometry"]) for f in feats
                 if f["properties"]["classification"]["name"] == name]
        _, n = ndi.label(labels == value)  # 4-connectivity, as traced
        assert len(geoms) == n, (name, len(geoms), n)
        assert sum(g.area for g in geoms) == (labels == value).sum()
        assert unary_union(geoms).area == (labels == value).sum()


def _features_without_ids(path) -> list[str]:
    """The features of a GeoJSON file as canonical JSON without their random ids, sorted."""
    out = []
    for f in load(path)["features"]:
        f = dict(f)
        f.pop("id")
        out.append(json.dumps(f, sort_keys=True))
    return sorted(out)


@pytest.mark.parametrize("rows_in_order", [True, False])
def test_random_maps_match_4_connected_regions_across_any_grid(tmp_path, rows_in_order):
    """Noise and blob maps on grids of every size, blocks in row order (stitched row by row)
    or shuffled (stitched at close): one valid feature per 4-connected region, exact areas
    and perimeters, whatever the grid."""
    from scipy import ndimage as ndi

    classes = [(1, "A", (255, 0, 0)), (2, "B", (0, 255, 0)), (3, "C", (0, 0, 255))]
    rng = np.random.default_rng(5 if rows_in_order else 6)
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        ch, cw = (int(v) for v in rng.integers(1, 24, 2))
        if trial % 2:
            lab = rng.integers(0, 5, (h, w)).astype(np.uint8)  # 4 = a class not exported
        else:
            noise = ndi.gaussian_filter(rng.random((h, w)), 1.5)
            lab = np.digitize(noise, np.quantile(noise, [0.25, 0.5, 0.75])).astype(np.uint8)
        path = tmp_path / f"r{trial}.geojson"
        origins = [(y, x) for y in range(0, h, ch) for x in range(0, w, cw)]
        if not rows_in_order:
            rng.shuffle(origins)
        with GeoJSONWriter(path, classes=classes, scale=1.0, mpp=0.5, chunk_shape=(ch, cw),
                           label_shape=(h, w), rows_in_order=rows_in_order) as gj:
            for y, x in origins:
                block = lab[y : y + ch, x : x + cw]
                if block.any():
                    gj.add_chunk(y, x, block)
        feats = load(path)["features"]
        for value, name, _ in classes:
            mine = [f for f in feats if f["properties"]["classification"]["name"] == name]
            geoms = [shape(f["geometry"]) for f in mine]
            assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms), trial
            assert len(geoms) == ndi.label(lab == value)[1], trial
            assert sum(g.area for g in geoms) == (lab == value).sum(), trial
            for f, g in zip(mine, geoms):
                m = f["properties"]["measurements"]
                assert m["Area px^2"] == g.area
                assert m["Perimeter µm"] == pytest.approx(g.length * 0.5)


def test_regions_touching_themselves_at_a_corner_are_valid(tmp_path):
    """A ring of pixels closed only by a corner contact encloses a hole touching its outer
    ring at one point (inside one block and across a seam): valid, area exact."""
    from wsiproto.export.trace import trace_labels

    lab = np.zeros((12, 12), np.uint8)
    lab[1:4, 1:4] = 1
    lab[2, 2] = 0  # the hole...
    lab[3, 3] = 0  # ...and the ring's corner: (2, 3) and (3, 2) touch at one corner only
    lab[6:9, 6:9] = 2  # the same shape with its contact on the seams x=8 and y=8
    lab[7, 7] = 0
    lab[8, 8] = 0
    lab[5:8, 9:12] = 3  # mirrored: contact at the top-right
    lab[6, 10] = 0
    lab[5, 11] = 0
    closed = trace_labels(lab, 0, 0, (1, 2, 3)).closed
    assert closed.poly_pinched.sum() == 3  # traced as one ring through the contact twice
    for chunk in (12, 8, 3):
        path = tmp_path / f"pinch{chunk}.geojson"
        write(path, lab, chunk=chunk)
        for f in load(path)["features"]:
            g = shape(f["geometry"])
            assert g.is_valid, (chunk, f["geometry"])
            assert len(g.interiors) == 1 and g.exterior.intersection(g.interiors[0]).length == 0
        for value, name in NAMES.items():
            geoms = [shape(f["geometry"]) for f in load(path)["features"]
                     if f["properties"]["classification"]["name"] == name]
            assert sum(g.area for g in geoms) == (lab == value).sum()


def test_traces_saved_and_loaded_give_the_same_geojson(tmp_path):
    """Blocks traced elsewhere (``trace_block`` in chunk tasks), saved and loaded (resume),
    give the file that tracing in the writer gives, apart from the random ids."""
    from wsiproto.export.geojson import trace_block
    from wsiproto.export.trace import BlockTrace

    lab = label_map()
    direct = tmp_path / "direct.geojson"
    write(direct, lab)
    via = tmp_path / "via.geojson"
    with GeoJSONWriter(via, classes=CLASSES, scale=1.0, mpp=0.25, chunk_shape=(CHUNK, CHUNK),
                       label_shape=lab.shape, rows_in_order=True) as gj:
        scratch: dict = {}
        for y0 in range(0, lab.shape[0], CHUNK):
            for x0 in range(0, lab.shape[1], CHUNK):
                block = lab[y0 : y0 + CHUNK, x0 : x0 + CHUNK]
                if block.any():
                    trace = trace_block(block, y0, x0, gj.formatter, pixel_counts=True,
                                        scratch=scratch)
                    np.testing.assert_array_equal(trace.pixel_counts,
                                                  np.bincount(block.ravel(), minlength=256))
                    trace.save(tmp_path / "t.npz")
                    gj.add_trace(BlockTrace.load(tmp_path / "t.npz"))
    assert _features_without_ids(via) == _features_without_ids(direct)
    # each feature is written as json.dumps writes it
    text = via.read_text()
    for f in load(via)["features"]:
        assert json.dumps(f, separators=(",", ":")) in text


def test_grid_size_does_not_change_the_polygons(tmp_path):
    """The same map traced on three grids: the same polygons (stitched exactly, no unions)."""
    from shapely import normalize

    rng = np.random.default_rng(9)
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(rng.random((300, 260)), 4)
    lab = np.digitize(noise, np.quantile(noise, [0.3, 0.55, 0.8])).astype(np.uint8)
    results = []
    for chunk in (300, 64, 37):
        path = tmp_path / f"g{chunk}.geojson"
        write(path, lab, chunk=chunk)
        results.append(sorted((f["properties"]["classification"]["name"],
                               normalize(shape(f["geometry"])).wkt)
                              for f in load(path)["features"]))
    assert results[0] == results[1] == results[2]


def test_rows_in_order_refuses_a_block_of_a_finished_row(tmp_path):
    lab = label_map()
    with GeoJSONWriter(tmp_path / "x.geojson", classes=CLASSES, scale=1.0,
                       chunk_shape=(CHUNK, CHUNK), label_shape=lab.shape,
                       rows_in_order=True) as gj:
        gj.add_chunk(64, 0, lab[64:128, :64])
        with pytest.raises(ValueError, match="after its row"):
            gj.add_chunk(0, 0, lab[:64, :64])
