"""`segment_slide` end to end on synthetic slides with a known class layout and a deterministic
stand-in model: labels, seams, pyramid, GeoJSON, areas, NGFF validity, resume, bad input."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import zarr

from wsiproto.errors import WsiprotoError
from wsiproto.segment import SegmentOptions, segment_slide
from wsiproto.segment.options import SimulatedCrash
from wsiproto.slide.synthetic import write_pyramidal_tiff

from standins import ColourStandIn, layout

W, H, MPP = 2600, 2200, 0.5


@pytest.fixture(scope="module")
def layout_slide(tmp_path_factory):
    render = layout(W, H)
    path = tmp_path_factory.mktemp("layout") / "layout.svs"
    write_pyramidal_tiff(path, W, H, render, mpp=MPP, levels=3, quality=95)
    return path, render


def options(out, **kw):
    base = dict(out=out, chunk=1024, zarr_chunk=512, overlap=32, batch_size=16, quiet=True,
                workers=2)
    base.update(kw)
    return SegmentOptions(**base)


def labels_of(folder, stem="layout", level=0):
    store = folder / stem / f"{stem}.ome.zarr"
    return zarr.open_group(str(store), mode="r")[f"labels/tissue/{level}"][...]


@pytest.fixture(scope="module")
def reference_run(layout_slide, tmp_path_factory):
    path, _ = layout_slide
    out = tmp_path_factory.mktemp("ref")
    summary = segment_slide(path, ColourStandIn(), options(out)).summary
    return out, summary


def interior(truth_map, value, margin):
    from scipy.ndimage import binary_erosion

    return binary_erosion(truth_map == value, iterations=margin)


def test_outputs_exist_and_nothing_partial_is_left(reference_run):
    out, summary = reference_run
    folder = out / "layout"
    names = {p.name for p in folder.iterdir()}
    assert names == {"layout.ome.zarr", "layout.geojson", "summary.json", "overlay.png"}
    assert json.loads((folder / "summary.json").read_text())["config_hash"] == summary["config_hash"]


def test_labels_match_the_layout(reference_run, layout_slide):
    out, _ = reference_run
    _, render = layout_slide
    labels = labels_of(out)
    assert labels.shape == (H, W) and labels.dtype == np.uint8
    yy, xx = np.mgrid[0:H, 0:W]
    truth = render.truth(xx + 0.5, yy + 0.5)
    for value in (1, 2, 3):
        core = interior(truth, value, 24)  # the tissue mask is 16 px coarse here
        acc = (labels[core] == value).mean()
        assert acc > 0.999, (value, acc)
    glass_far = interior(truth, 0, 40)
    assert (labels[glass_far] == 0).mean() > 0.99


def test_no_seams_labels_do_not_depend_on_chunking(reference_run, layout_slide, tmp_path):
    out, _ = reference_run
    path, _ = layout_slide
    segment_slide(path, ColourStandIn(), options(tmp_path, chunk=512, workers=1))
    np.testing.assert_array_equal(labels_of(tmp_path), labels_of(out))


def test_pyramid_levels_are_mode_downsampled(reference_run):
    out, _ = reference_run
    group = zarr.open_group(str(out / "layout" / "layout.ome.zarr"), mode="r")
    levels = sorted(int(k) for k in group["labels/tissue"].array_keys())
    assert levels == list(range(len(levels))) and len(levels) >= 2
    l0, l1 = labels_of(out, level=0), labels_of(out, level=1)
    assert l1.shape == ((H + 1) // 2, (W + 1) // 2)
    # Where a 2x2 block is uniform, the next level keeps its value.
    blocks = l0[: H // 2 * 2, : W // 2 * 2].reshape(H // 2, 2, W // 2, 2)
    uniform = (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3))
    assert (l1[: H // 2, : W // 2][uniform] == blocks[:, 0, :, 0][uniform]).all()
    # The image the labels annotate has the same levels.
    assert sorted(int(k) for k in group.array_keys()) == levels


def test_geojson_matches_the_labels(reference_run):
    from shapely.geometry import shape
    from shapely.ops import unary_union

    out, summary = reference_run
    data = json.loads((out / "layout" / "layout.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    labels = labels_of(out)
    by_class: dict[str, list] = {}
    ids = set()
    for f in data["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert set(props["classification"]) >= {"name", "color"}
        geom = shape(f["geometry"])
        assert geom.is_valid and geom.geom_type == "Polygon"
        by_class.setdefault(props["classification"]["name"], []).append(geom)
        ids.add(f["id"])
    assert len(ids) == len(data["features"])
    assert set(by_class) == {"TUM", "STR", "LYM"}
    for value, name in ((1, "TUM"), (2, "STR"), (3, "LYM")):
        union = unary_union(by_class[name])
        assert union.area == pytest.approx((labels == value).sum(), rel=1e-9)
    # The STR ring keeps its hole; the TUM rectangle crossing chunk seams is one polygon.
    assert any(len(g.interiors) >= 1 for g in by_class["STR"])
    big_tum = max(by_class["TUM"], key=lambda g: g.area)
    minx, miny, maxx, maxy = big_tum.bounds
    assert minx == pytest.approx(0.08 * W, abs=20) and maxx == pytest.approx(0.55 * W, abs=20)


def test_summary_areas(reference_run, layout_slide):
    out, summary = reference_run
    labels = labels_of(out)
    px_mm2 = (MPP / 1000) ** 2
    for value, name in ((1, "TUM"), (2, "STR"), (3, "LYM")):
        assert summary["class_area_mm2"][name] == pytest.approx((labels == value).sum() * px_mm2,
                                                                rel=1e-6)
    tissue = (labels > 0).sum() * px_mm2
    assert summary["tissue_area_mm2"] == pytest.approx(tissue, rel=1e-6)
    assert sum(summary["class_percent_of_tissue"].values()) == pytest.approx(100, abs=0.01)
    # Against the drawn layout: the ring's true area is pi (ro^2 - ri^2).
    ro, ri = 0.20 * min(W, H), 0.09 * min(W, H)
    ring_mm2 = np.pi * (ro * ro - ri * ri) * px_mm2
    assert summary["class_area_mm2"]["STR"] == pytest.approx(ring_mm2, rel=0.02)
    assert set(summary["timings"]) >= {"tissue_s", "inference_s", "ome_zarr_s", "geojson_s",
                                       "overlay_s", "total_s"}
    assert summary["tiles"]["run_now"] > 0


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ngff_validates_and_reads(layout_slide, tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, _ = layout_slide
    segment_slide(path, ColourStandIn(mpp=1.0), options(tmp_path, ngff_version=version,
                                                         probabilities=True))
    store = tmp_path / "layout" / "layout.ome.zarr"
    nodes = list(Reader(parse_url(str(store)))())
    assert nodes, "ome-zarr Reader found nothing"
    label_nodes = [n for n in nodes if n.metadata.get("color") or "labels" in str(n.zarr)]
    assert label_nodes
    if version == "0.5":
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image import Image
        from ome_zarr_models.v04.image_label import ImageLabel
    group = zarr.open_group(str(store), mode="r")
    Image.from_zarr(group)
    ImageLabel.from_zarr(group["labels/tissue"])
    probs = group["probabilities/0"]
    assert probs.shape[0] == 4 and probs.dtype == np.uint8


def test_resume_after_a_crash_is_identical(reference_run, layout_slide, tmp_path):
    out, _ = reference_run
    path, _ = layout_slide
    with pytest.raises(SimulatedCrash):
        segment_slide(path, ColourStandIn(), options(tmp_path, fail_after_chunks=2, workers=1))
    folder = tmp_path / "layout"
    assert not (folder / "summary.json").exists()
    assert not (folder / "layout.ome.zarr").exists() and not (folder / "layout.geojson").exists()
    assert len(list((folder / ".partial" / "done").iterdir())) == 2
    messages = []
    result = segment_slide(path, ColourStandIn(), options(tmp_path), echo=messages.append)
    assert any("resuming: 2 of" in m for m in messages)
    assert result.chunks_resumed == 2 and result.resumed and not result.already_complete
    summary = result.summary
    assert summary["chunks"]["run_now"] == summary["chunks"]["visited"] - 2
    np.testing.assert_array_equal(labels_of(tmp_path), labels_of(out))
    # the chunks traced before the crash (their saved traces) and after it: the same GeoJSON
    assert features_without_ids(tmp_path) == features_without_ids(out)
    assert summary["class_area_mm2"] == reference_run[1]["class_area_mm2"]
    for level in range(1, 3):
        np.testing.assert_array_equal(labels_of(tmp_path, level=level),
                                      labels_of(out, level=level))


def features_without_ids(out, stem="layout") -> list[str]:
    data = json.loads((out / stem / f"{stem}.geojson").read_text())
    return sorted(json.dumps({k: v for k, v in f.items() if k != "id"}, sort_keys=True)
                  for f in data["features"])


def test_geojson_traced_in_the_chunk_tasks_equals_tracing_the_labels(reference_run):
    """The polygons traced inside the chunk tasks and stitched across chunk seams are the ones
    a single pass over the finished label map gives (on another block grid)."""
    from shapely import normalize
    from shapely.geometry import shape

    from wsiproto.export.geojson import GeoJSONWriter

    out, summary = reference_run
    labels = labels_of(out)
    classes = [(v["value"], v["name"], tuple(v["color"])) for v in summary["labels"][1:-1]]
    path = out / "retraced.geojson"
    with GeoJSONWriter(path, classes=classes, scale=1.0, mpp=MPP, chunk_shape=(700, 700),
                       label_shape=labels.shape, rows_in_order=True) as gj:
        for y0 in range(0, labels.shape[0], 700):
            for x0 in range(0, labels.shape[1], 700):
                gj.add_chunk(y0, x0, labels[y0 : y0 + 700, x0 : x0 + 700])

    def polygons(p):
        return sorted((f["properties"]["classification"]["name"],
                       normalize(shape(f["geometry"])).wkt,
                       json.dumps(f["properties"]["measurements"], sort_keys=True))
                      for f in json.loads(p.read_text())["features"])

    assert polygons(out / "layout" / "layout.geojson") == polygons(path)
    path.unlink()


def test_rerun_is_a_no_op_and_other_configs_need_overwrite(layout_slide, tmp_path):
    path, _ = layout_slide
    segment_slide(path, ColourStandIn(), options(tmp_path))
    model = ColourStandIn()
    messages = []
    segment_slide(path, model, options(tmp_path), echo=messages.append)
    assert model.calls == 0 and "already complete" in messages[0]
    with pytest.raises(WsiprotoError, match="--overwrite"):
        segment_slide(path, ColourStandIn(), options(tmp_path, overlap=16))
    summary = segment_slide(path, ColourStandIn(), options(tmp_path, overlap=16, overwrite=True,
                                                           gzip=True, objects="detection")).summary
    folder = tmp_path / "layout"
    assert summary["config"]["overlap"] == 16
    assert not (folder / "layout.geojson").exists()
    with gzip.open(folder / "layout.geojson.gz", "rt") as fh:
        data = json.load(fh)
    assert {f["properties"]["objectType"] for f in data["features"]} == {"detection"}


def test_geojson_coordinates_are_level0_pixels_when_the_model_is_coarser(layout_slide, tmp_path):
    """Model at 1.0 um/px on a 0.5 um/px slide: labels at half size, GeoJSON in level-0 px."""
    from shapely.geometry import shape

    path, _ = layout_slide
    summary = segment_slide(path, ColourStandIn(mpp=1.0, tile_size=64),
                            options(tmp_path, overlap=16)).summary
    assert summary["label_frame"]["level0_px_per_label_px"] == pytest.approx(2.0)
    assert labels_of(tmp_path).shape == (H // 2, W // 2)
    data = json.loads((tmp_path / "layout" / "layout.geojson").read_text())
    tum = max((shape(f["geometry"]) for f in data["features"]
               if f["properties"]["classification"]["name"] == "TUM"), key=lambda g: g.area)
    minx, miny, maxx, maxy = tum.bounds
    assert minx == pytest.approx(0.08 * W, abs=24) and maxy == pytest.approx(0.45 * H, abs=24)
    for f in data["features"][:20]:
        for ring in f["geometry"]["coordinates"]:
            for x, y in ring:
                assert round(x, 2) == x and round(y, 2) == y


def test_blank_slide_gives_valid_empty_outputs(tmp_path):
    blank = write_pyramidal_tiff(tmp_path / "blank.svs", 1024, 1024,
                                 lambda x, y, w, h: np.full((h, w, 3), 243, np.uint8),
                                 mpp=0.5, levels=2)
    messages = []
    summary = segment_slide(blank, ColourStandIn(), options(tmp_path / "out"),
                            echo=messages.append).summary
    assert any("no tissue" in m for m in messages)
    data = json.loads((tmp_path / "out" / "blank" / "blank.geojson").read_text())
    assert data == {"type": "FeatureCollection", "features": []} or data["features"] == []
    assert summary["tissue_area_mm2"] == 0
    assert (labels_of(tmp_path / "out", "blank") == 0).all()


def test_bad_inputs(layout_slide, tmp_path):
    path, render = layout_slide
    with pytest.raises(WsiprotoError, match="upsampling"):
        segment_slide(path, ColourStandIn(mpp=0.1), options(tmp_path))
    nompp = write_pyramidal_tiff(tmp_path / "nompp.svs", 800, 600, render, mpp=None, levels=1)
    with pytest.raises(WsiprotoError, match="--mpp"):
        segment_slide(nompp, ColourStandIn(), options(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(WsiprotoError, match="a-file: is a file, not a folder; choose another"):
        segment_slide(path, ColourStandIn(), options(blocker / "sub"))


def test_undecodable_region_is_reported_with_coordinates(layout_slide, tmp_path):
    import tifffile

    path, _ = layout_slide
    bad = tmp_path / "layout.svs"
    shutil.copy(path, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        index = 2 * tiles_across + 3  # a tile inside the TUM rectangle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(b"\x00\xff" * ((count - 40) // 2))
    with pytest.raises(WsiprotoError, match=r"cannot decode region at level-0 x=\d+ y=\d+"):
        segment_slide(bad, ColourStandIn(), options(tmp_path / "out", workers=1))
    assert not (tmp_path / "out" / "layout" / "summary.json").exists()


def test_a_failing_geojson_export_stops_the_run_early(layout_slide, tmp_path, monkeypatch):
    """An error in the GeoJSON thread ends the run at the next chunk, not after the whole
    slide went through the model; nothing is left under a final name."""
    from wsiproto.export.geojson import GeoJSONWriter

    path, _ = layout_slide

    def broken(self, trace):
        raise OSError("disk full (simulated)")

    full = ColourStandIn()
    segment_slide(path, full, options(tmp_path / "full", chunk=512, workers=1))
    monkeypatch.setattr(GeoJSONWriter, "add_trace", broken)
    model = ColourStandIn()
    with pytest.raises(RuntimeError, match="GeoJSON export failed: disk full"):
        segment_slide(path, model, options(tmp_path / "out", chunk=512, workers=1))
    assert model.calls < full.calls / 2, (model.calls, full.calls)
    folder = tmp_path / "out" / "layout"
    assert {p.name for p in folder.iterdir()} <= {".partial"}


def test_resume_redoes_a_chunk_whose_trace_was_lost(reference_run, layout_slide, tmp_path):
    """A done marker whose saved trace is truncated (the two did not both reach the disk)
    does not count: resuming redoes that chunk and the outputs are those of a clean run."""
    out, _ = reference_run
    path, _ = layout_slide
    with pytest.raises(SimulatedCrash):
        segment_slide(path, ColourStandIn(), options(tmp_path, fail_after_chunks=2, workers=1))
    partial = tmp_path / "layout" / ".partial"
    key = sorted(p.stem for p in (partial / "done").iterdir()
                 if (partial / "traces" / f"{p.stem}.npz").exists())[0]  # a chunk with tissue
    trace = partial / "traces" / f"{key}.npz"
    trace.write_bytes(trace.read_bytes()[:50])
    messages = []
    summary = segment_slide(path, ColourStandIn(), options(tmp_path),
                            echo=messages.append).summary
    assert any("resuming: 1 of" in m for m in messages), messages
    assert summary["chunks"]["run_now"] == summary["chunks"]["visited"] - 1
    np.testing.assert_array_equal(labels_of(tmp_path), labels_of(out))
    assert features_without_ids(tmp_path) == features_without_ids(out)


@pytest.mark.parametrize("moment", ["partial-without-config", "store-being-created",
                                    "partial-being-made"])
def test_a_run_killed_while_setting_up_resumes(reference_run, layout_slide, tmp_path, moment):
    """A worker killed while a run creates its .partial folder or its OME-Zarr store leaves
    a slide the next run finishes (it used to be refused as "another configuration", or to
    fail on a store without its arrays)."""
    out, _ = reference_run
    path, _ = layout_slide
    with pytest.raises(SimulatedCrash):
        segment_slide(path, ColourStandIn(), options(tmp_path, fail_after_chunks=1, workers=1))
    partial = tmp_path / "layout" / ".partial"
    if moment == "partial-without-config":
        (partial / "config.json").unlink()
    elif moment == "store-being-created":
        shutil.rmtree(partial / "layout.ome.zarr")
        (partial / "layout.ome.zarr.new").mkdir()  # half made: no arrays
        shutil.rmtree(partial / "done")
        (partial / "done").mkdir()
    else:
        shutil.rmtree(partial)
        (tmp_path / "layout" / f".partial.new-{12345}" / "done").mkdir(parents=True)
    result = segment_slide(path, ColourStandIn(), options(tmp_path))
    assert result.summary["chunks"]["run_now"] == result.summary["chunks"]["visited"]
    np.testing.assert_array_equal(labels_of(tmp_path), labels_of(out))
    assert {p.name for p in (tmp_path / "layout").iterdir()} == {
        "layout.ome.zarr", "layout.geojson", "summary.json", "overlay.png"}
