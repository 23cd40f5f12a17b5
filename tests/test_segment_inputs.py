"""`segment` on the inputs users bring: a slide by URL (a server that dies mid-run, then a
rerun that resumes), regions of interest drawn in QuPath, hostile slide names, two runs into
one folder. Nothing is ever written outside --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from slideservers import TOKEN, range_server
from standins import ColourStandIn, layout
from test_cli import assert_one_line_error, wsiproto
from wsiproto.errors import WsiprotoError
from wsiproto.segment import SegmentOptions, segment_slide
from wsiproto.slide import urls
from wsiproto.slide.synthetic import write_pyramidal_tiff

W, H = 1600, 1200


def labels(folder: Path, level: int = 0) -> np.ndarray:
    group = zarr.open_group(str(folder / f"{folder.name}.ome.zarr"), mode="r")
    return group[f"labels/tissue/{level}"][...]


def features(folder: Path) -> list:
    import shapely
    from shapely.geometry import shape

    data = json.loads((folder / f"{folder.name}.geojson").read_text())
    return sorted((f["properties"]["classification"]["name"],
                   shapely.normalize(shape(f["geometry"])).wkt) for f in data["features"])


def options(out: Path, **kw) -> SegmentOptions:
    return SegmentOptions(**{"out": out, "chunk": 512, "batch_size": 16, "quiet": True,
                             "overlap": 32, **kw})


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size (to see that nothing outside --out changed)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def layout_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "layout.svs"
    write_pyramidal_tiff(path, W, H, layout(W, H), mpp=0.5, levels=2, quality=95)
    return path


# -- slides by URL ------------------------------------------------------------------------------
def test_a_url_slide_survives_a_dead_server_and_resumes(layout_slide, tmp_path, monkeypatch):
    """By HTTP: the server dies mid-run -> one line, finished chunks kept; the rerun (server
    back, a fresh token) resumes and gives what the local file gives; no token anywhere."""
    monkeypatch.setattr(urls, "BLOCK_SIZE", 32 << 10)  # the slide spans many blocks
    data = layout_slide.read_bytes()
    local = segment_slide(layout_slide, ColourStandIn(), options(tmp_path / "local")).folder
    out = tmp_path / "remote"
    with range_server({"/cases/layout.svs": data}, die_after_bytes=len(data) // 2) as server:
        url, port = server.url("/cases/layout.svs"), server.port
        with pytest.raises(WsiprotoError) as err:
            segment_slide(url, ColourStandIn(), options(out))
    text = str(err.value)
    assert "\n" not in text and TOKEN not in text and "<redacted>" in text, text
    done = list((out / "layout" / ".partial" / "done").iterdir())
    assert done, "the chunks finished before the server died are kept"
    with range_server({"/cases/layout.svs": data}, port=port) as server:
        result = segment_slide(server.url("/cases/layout.svs"), ColourStandIn(), options(out))
    assert result.chunks_resumed == len(done) and result.folder == out / "layout"
    np.testing.assert_array_equal(labels(result.folder), labels(local))
    assert features(result.folder) == features(local)
    for f in result.folder.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert result.summary["slide"]["path"].endswith("/cases/layout.svs?<redacted>")


# -- regions of interest ------------------------------------------------------------------------
def qupath_geojson(path: Path, rings, name="Tumor", object_type="annotation") -> Path:
    feature = {"type": "Feature", "id": "6f1c0a5e-0b0f-4f4e-9d67-3f0c2d6b9a10",
               "geometry": {"type": "Polygon", "coordinates": rings},
               "properties": {"objectType": object_type,
                              "classification": {"name": name, "color": [200, 0, 0]}}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def circle(cx, cy, r, n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in t]
    return pts + [pts[0]]


def test_labels_and_polygons_stay_inside_the_roi(layout_slide, tmp_path):
    import shapely
    from shapely.geometry import Polygon, shape

    # A disc around the STR ring with a hole over its TUM core (both drawn in QuPath).
    cx, cy, r = 0.68 * W, 0.68 * H, 0.24 * min(W, H)
    roi = qupath_geojson(tmp_path / "roi.geojson", [circle(cx, cy, r), circle(cx, cy, 40)[::-1]])
    full = segment_slide(layout_slide, ColourStandIn(), options(tmp_path / "full")).folder
    result = segment_slide(layout_slide, ColourStandIn(), options(tmp_path / "roi", roi=str(roi)))
    lab, ref = labels(result.folder), labels(full)
    region = Polygon(circle(cx, cy, r), [circle(cx, cy, 40)])
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    inside = shapely.contains_xy(region, xx, yy)
    assert (lab[~inside] == 0).all()  # nothing outside the region
    np.testing.assert_array_equal(lab[inside], ref[inside])  # inside: what a full run gives
    grown = region.buffer(1.5)
    feats = json.loads((result.folder / "layout.geojson").read_text())["features"]
    assert feats and all(grown.contains(shape(f["geometry"])) for f in feats)
    summary = result.summary
    assert summary["roi"]["features"] == 1
    assert summary["roi"]["area_mm2"] == pytest.approx(region.area * 0.25e-6, rel=1e-3)
    full_area = json.loads((full / "summary.json").read_text())["tissue_area_mm2"]
    assert 0 < summary["tissue_area_mm2"] < full_area
    # Another class than the file's: nothing selected -> one line; a changed ROI -> another run
    with pytest.raises(WsiprotoError, match="roi.geojson"):
        segment_slide(layout_slide, ColourStandIn(),
                      options(tmp_path / "x", roi=str(roi), roi_class="Stroma"))


@pytest.mark.parametrize("case,needle", [
    ("outside", "outside the slide"),
    ("empty", "no area annotation; draw the region"),
    ("garbage", "roi.geojson"),
])
def test_bad_roi_files_are_one_line(layout_slide, tmp_path, case, needle):
    roi = tmp_path / "roi.geojson"
    if case == "outside":
        qupath_geojson(roi, [circle(W + 500, H + 500, 100)])
    elif case == "empty":
        roi.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    else:
        roi.write_text("{not json")
    proc = wsiproto("segment", str(layout_slide), "--roi", str(roi), "--out",
                    str(tmp_path / "out"), "--quiet")
    assert_one_line_error(proc, str(roi))
    assert needle in proc.stderr.lower() or needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "layout").exists()


# -- names that must not escape --out -----------------------------------------------------------
HOSTILE = ["...svs", "..svs", ".svs", ".hidden.svs", "-rf.svs", "a b.svs"]


@pytest.mark.parametrize("name", HOSTILE)
def test_no_slide_name_writes_outside_out(layout_slide, tmp_path, name):
    """The slide's name becomes a folder strictly inside --out, whatever it is; the mapping
    is in summary.json; nothing beside --out is created or changed, with --overwrite too."""
    work = tmp_path / "work"
    (work / "slides").mkdir(parents=True)
    slide = work / "slides" / name
    slide.write_bytes(layout_slide.read_bytes())
    (work / "summary.json").write_text("precious")  # what `...svs` used to overwrite
    out = work / "out"
    before = tree(work)
    for extra in ((), ("--overwrite",)):
        segment_slide(slide, ColourStandIn(), options(out, overwrite=bool(extra)))
    after = tree(work)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    folders = [p for p in out.iterdir()]
    assert len(folders) == 1 and folders[0].parent == out and not folders[0].name.startswith(".")
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["output_name"]["name"] == folders[0].name
    assert summary["output_name"]["changed"] == (folders[0].name != Path(name).stem)


# -- one run per folder -------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_in_one_line(layout_slide, tmp_path):
    """While one `wsiproto segment` runs, a second one into the same --out (with --overwrite
    too) says so in one line and touches nothing; after the first ends, the folder is free."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "wsiproto", "segment", str(layout_slide),
                              "--out", str(out), "--quiet", "--chunk-size", "512"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / "layout" / ".lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    os.kill(first.pid, signal.SIGSTOP)  # held mid-run, lock and all, however fast it is
    try:
        for extra in ((), ("--overwrite",)):
            second = wsiproto("segment", str(layout_slide), "--out", str(out), "--quiet",
                              "--chunk-size", "512", *extra)
            assert_one_line_error(second, "another wsiproto run", f"pid {first.pid}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(300) == 0, first.stderr.read()
    assert (out / "layout" / "summary.json").exists() and not lock.exists()
    again = wsiproto("segment", str(layout_slide), "--out", str(out), "--quiet",
                     "--chunk-size", "512")
    assert again.returncode == 0 and "already complete" in again.stderr
