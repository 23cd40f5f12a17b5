"""Defects an outside trial found (issue 16) that are not about one module: a full disk, a
closed pipe, metrics that must not be lost, options checked alike everywhere, messages that
name the file and the fix, --mpp that overrides, inputs checked before torch is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import zarr

from conftest import shared_file
from standins import ColourStandIn, layout
from test_cli import assert_one_line_error, wsiproto
from wsiproto.errors import WsiprotoError
from wsiproto.segment import SegmentOptions, segment_slide
from wsiproto.slide.synthetic import write_pyramidal_tiff

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("rel") / "layout.svs"
    write_pyramidal_tiff(path, 1600, 1200, layout(1600, 1200), mpp=0.5, levels=2)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or 'not root'}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_rerun_resumes(slide, small_disk,
                                                                         tmp_path):
    opts = dict(chunk=512, batch_size=16, quiet=True, overlap=32)
    ref = segment_slide(slide, ColourStandIn(), SegmentOptions(out=tmp_path / "ref", **opts))
    out = small_disk / "out"
    with pytest.raises(WsiprotoError) as err:
        segment_slide(slide, ColourStandIn(), SegmentOptions(out=out, **opts))
    text = str(err.value)
    assert "No space left on device" in text and str(out / "layout") in text
    assert "rerun" in text and "\n" not in text
    assert not (out / "layout" / "summary.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = segment_slide(slide, ColourStandIn(), SegmentOptions(out=out, **opts))
    a = zarr.open_group(str(result.folder / "layout.ome.zarr"), mode="r")["labels/tissue/0"]
    b = zarr.open_group(str(ref.folder / "layout.ome.zarr"), mode="r")["labels/tissue/0"]
    np.testing.assert_array_equal(a[...], b[...])
    assert result.summary["class_area_mm2"] == ref.summary["class_area_mm2"]


def test_a_closed_pipe_ends_quietly():
    slide = shared_file("slides", "CMU-1-Small-Region.svs")
    proc = subprocess.Popen([sys.executable, "-m", "wsiproto", "info", str(slide), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # `| head -0`: the reader is gone before we write
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == "", err


def test_evaluate_prints_its_metrics_before_a_failed_save(tmp_path):
    from texture_sets import write_bcss_tree
    from wsiproto.model import create_model, save_model

    data = write_bcss_tree(tmp_path / "data", train=4, val=2, test=3)
    model = tmp_path / "model"
    save_model(create_model("dualproto-tiny"), model)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = wsiproto("evaluate", "--model", str(model), "--data", str(data), "--workers", "0",
                    "--quiet", "--save", str(blocker / "eval.json"), env=ENV)
    assert_one_line_error(proc, "cannot save the metrics", "stdout")
    assert {"mIoU", "mDice", "IoU"} <= set(json.loads(proc.stdout))


@pytest.mark.parametrize("args", [
    ("segment", "X", "--chunk-size", "0"), ("segment", "X", "--chunk-size", "-512"),
    ("segment", "X", "--batch-size", "0"), ("segment", "X", "--batch-size", "-1"),
    ("segment", "X", "--workers", "0"), ("segment", "X", "--workers", "-1"),
    ("segment", "X", "--mpp", "0"), ("segment", "X", "--mpp", "nan"),
    ("cohort", "X", "--batch-size", "0"), ("cohort", "X", "--workers", "0"),
    ("evaluate", "--model", "m", "--data", "d", "--batch-size", "0"),
    ("evaluate", "--model", "m", "--data", "d", "--batch-size", "-5"),
    ("train", "--data", "d", "--epochs", "0"),
])
def test_numbers_are_checked_alike_in_every_command(args):
    proc = wsiproto(*args, env=ENV)
    assert_one_line_error(proc, "argument --", "see `wsiproto")


def test_a_chunk_size_off_the_zarr_grid_is_one_line(slide, tmp_path):
    proc = wsiproto("segment", str(slide), "--chunk-size", "700", "--out", str(tmp_path),
                    env=ENV)
    assert_one_line_error(proc, "--chunk-size", "multiple of 512")
    assert list(tmp_path.iterdir()) == []


def test_mpp_overrides_the_slides_own_and_says_so(slide, tmp_path):
    r = segment_slide(slide, ColourStandIn(), SegmentOptions(out=tmp_path, mpp=0.25, quiet=True,
                                                             chunk=512),
                      echo=(said := []).append)
    assert r.summary["slide"]["mpp"] == 0.25 and r.summary["slide"]["mpp_source"] == "user"
    assert r.summary["slide"]["native_mpp"] == pytest.approx(0.5)
    assert r.summary["label_frame"]["level0_px_per_label_px"] == pytest.approx(2.0)
    assert any("--mpp 0.25 overrides the slide's own 0.5" in m for m in said)
    proc = wsiproto("segment", str(slide), "--mpp", "0.0001", "--out", str(tmp_path / "x"),
                    env=ENV)
    assert_one_line_error(proc, "--mpp", "0.02")


def test_missing_inputs_are_refused_before_torch_is_imported(tmp_path):
    code = ("import sys; from wsiproto.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    for args in (["segment", str(tmp_path / "none.svs")],
                 ["segment", str(shared_file("slides", "CMU-1-Small-Region.svs")),
                  "--model", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, env=ENV, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().endswith("False"), proc.stderr


def test_messages_name_the_file_and_the_fix(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert_one_line_error(wsiproto("train", "--data", str(f), "--out", str(tmp_path / "r"),
                                   env=ENV), str(f), "is a file, not a dataset folder", "pass")
    assert_one_line_error(wsiproto("segment", shared_file("slides", "CMU-1-Small-Region.svs")
                                   .as_posix(), "--out", str(f), env=ENV),
                          str(f), "is a file, not a folder")


def test_a_failed_run_leaves_no_empty_folder(tmp_path):
    cut = tmp_path / "cut.svs"
    cut.write_bytes(shared_file("slides", "CMU-1-Small-Region.svs").read_bytes()[:1_276_200])
    out = tmp_path / "out"
    proc = wsiproto("segment", str(cut), "--mpp", "0.5", "--out", str(out), env=ENV)
    assert_one_line_error(proc, str(cut), "truncated or corrupt")
    assert not (out / "cut").exists()


def test_help_says_the_defaults():
    seg = wsiproto("segment", "--help").stdout
    assert "default: the small demo model bundled" in " ".join(seg.split())
    train = " ".join(wsiproto("train", "--help").stdout.split())
    assert "default: dualproto-tiny" in train


def test_uuid_ids_are_valid(slide, tmp_path):
    r = segment_slide(slide, ColourStandIn(), SegmentOptions(out=tmp_path, quiet=True, chunk=512))
    feats = json.loads((r.folder / "layout.geojson").read_text())["features"]
    assert feats and all(uuid.UUID(f["id"]) for f in feats)
    assert len({f["id"] for f in feats}) == len(feats)
    shutil.rmtree(r.folder)


def test_a_model_config_that_does_not_add_up_names_its_file(tmp_path):
    from wsiproto.model import create_model, save_model

    folder = tmp_path / "model"
    save_model(create_model("dualproto-tiny"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["masks"]["thresholds"] = [0.5, 0.5, 0.5]  # 4 classes
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = wsiproto("segment", str(shared_file("slides", "CMU-1-Small-Region.svs")),
                    "--model", str(folder), "--out", str(tmp_path / "out"), env=ENV)
    assert_one_line_error(proc, str(folder / "config.json"), "3 values for 4 classes",
                          "one presence threshold per class")
