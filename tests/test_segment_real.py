"""`wsiproto segment` end to end on the real slides with a (random-init) dualproto-tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from conftest import shared_file
from test_cli import assert_one_line_error, wsiproto


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from wsiproto.model import create_model, save_model

    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(create_model("dualproto-tiny"), folder)
    return folder


@pytest.mark.parametrize("name,extra", [
    ("CMU-1-Small-Region.svs", ()),
    ("TCGA-CR-7395-01A-01-TS1.svs", ("--mpp", "0.5", "--ngff-version", "0.4", "--gzip")),
])
def test_segment_real_slide(tiny_model, tmp_path, name, extra):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    slide = shared_file("slides", name)
    proc = wsiproto("segment", str(slide), "--model", str(tiny_model), "--out", str(tmp_path),
                    "--quiet", *extra)
    assert proc.returncode == 0, proc.stderr
    stem = name.split(".")[0]
    folder = tmp_path / stem
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["tiles"]["run_now"] > 10
    assert summary["tissue_area_mm2"] > 0
    assert abs(sum(summary["class_percent_of_tissue"].values()) - 100) < 0.01
    store = folder / f"{stem}.ome.zarr"
    tissue = zarr.open_group(str(store), mode="r")["labels/tissue"]
    w, h = summary["label_frame"]["width"], summary["label_frame"]["height"]
    assert tissue["0"].shape == (h, w)
    top = tissue[str(len(list(tissue.array_keys())) - 1)][...]
    assert np.isin(top, range(6)).all() and (top > 0).any()  # 0, 4 classes, background
    assert list(Reader(parse_url(str(store)))())
    geo = folder / (f"{stem}.geojson.gz" if "--gzip" in extra else f"{stem}.geojson")
    assert geo.exists() and (folder / "overlay.png").exists()
    # A second run finds the finished result and does nothing.
    again = wsiproto("segment", str(slide), "--model", str(tiny_model), "--out", str(tmp_path),
                     "--quiet", *extra)
    assert again.returncode == 0 and "already complete" in again.stderr


def test_segment_without_mpp_is_a_clear_error(tiny_model, tmp_path):
    slide = shared_file("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    proc = wsiproto("segment", str(slide), "--model", str(tiny_model), "--out", str(tmp_path))
    assert_one_line_error(proc, "--mpp", str(slide))


def test_segment_bad_model_folder(tmp_path):
    slide = shared_file("slides", "CMU-1-Small-Region.svs")
    proc = wsiproto("segment", str(slide), "--model", str(tmp_path), "--out", str(tmp_path))
    assert_one_line_error(proc, "config.json")
