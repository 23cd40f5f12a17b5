"""DICOM WSI: the real CMU slide converted at test time into a standards-conformant series
(wsidicomizer: 4 instances, JPEG re-encoded in 512 px tiles), then read, described and
segmented like any slide; a non-conformant DICOM file and a truncated series are one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from wsiproto.cli import main
from wsiproto.errors import WsiprotoError
from wsiproto.slide import Slide, is_slide_folder

from conftest import shared_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def wsiproto(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiproto", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def cmu_svs():
    return shared_file("slides", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def cmu_dicom(cmu_svs, tmp_path_factory):
    """CMU-1-Small-Region as a DICOM WSI series (needs Debian's libturbojpeg0, see .ci/run)."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer (dev extra) absent")
    folder = tmp_path_factory.mktemp("cmu-dicom") / "CMU-1-Small-Region"
    written = wsidicomizer.WsiDicomizer.convert(cmu_svs, folder)
    assert len(written) == 4  # volume, label, overview, thumbnail
    return folder


def test_info_on_the_folder_and_on_one_of_its_files(cmu_dicom, capsys):
    assert is_slide_folder(cmu_dicom)
    assert main(["info", str(cmu_dicom), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "dicom" and info["vendor"] == "dicom"
    assert (info["width"], info["height"]) == (2220, 2967) and info["level_count"] == 1
    assert info["mpp"] == pytest.approx(0.499) and info["mpp_source"] == "vendor"
    assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}
    assert 0.15 < info["tissue_fraction"] < 0.5  # as on the SVS
    volume = max(cmu_dicom.iterdir(), key=lambda p: p.stat().st_size)
    with Slide(volume) as one:  # one instance opens its whole series
        assert one.backend == "dicom" and one.size == (2220, 2967)
        assert set(one.associated_image_names) == {"label", "macro", "thumbnail"}


@pytest.mark.parametrize("backend", ["dicom", "openslide"])
def test_pixels_match_the_svs(cmu_dicom, cmu_svs, backend):
    """Re-encoded JPEG: mean absolute difference under 3 against the SVS's own pixels."""
    with Slide(cmu_dicom, backend=backend) as dcm, Slide(cmu_svs) as svs:
        assert dcm.size == svs.size and dcm.mpp == pytest.approx(svs.mpp)
        for loc, size, mpp in (((600, 900), (512, 512), None), ((0, 0), (278, 371), 4.0),
                               ((1700, 2600), (600, 500), None)):
            a = dcm.read_region(loc, size, mpp=mpp).astype(int)
            b = svs.read_region(loc, size, mpp=mpp).astype(int)
            assert np.abs(a - b).mean() < 3, (loc, size, mpp)
        np.testing.assert_array_equal(dcm.associated_image("label").shape,
                                      svs.associated_image("label").shape)


def test_segment_end_to_end(cmu_dicom, tmp_path):
    out = tmp_path / "out"
    proc = wsiproto("segment", str(cmu_dicom), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    folder = out / "CMU-1-Small-Region"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["slide"]["backend"] == "dicom"
    assert summary["slide"]["mpp"] == pytest.approx(0.499)
    assert summary["tissue_area_mm2"] > 0.1
    for name in ("CMU-1-Small-Region.ome.zarr", "CMU-1-Small-Region.geojson", "overlay.png"):
        assert (folder / name).exists()


@pytest.mark.parametrize("backend", ["auto", "dicom", "openslide"])
def test_non_conformant_dicom_is_one_line(backend):
    """TCGA-XK-AAJU-small.dcm has no ImageType: neither wsidicom nor OpenSlide reads it; the
    message says why and never sends the user to another backend that fails too."""
    path = shared_file("slides", "TCGA-XK-AAJU-small.dcm")
    proc = wsiproto("info", str(path), "--backend", backend)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "DICOM" in lines[0] and "ImageType" in lines[0]
    assert "--backend" not in lines[0]


@pytest.mark.parametrize("backend", ["dicom", "openslide"])
def test_a_truncated_instance_fails_at_open(cmu_dicom, tmp_path, backend):
    cut = tmp_path / "cut"
    shutil.copytree(cmu_dicom, cut)
    volume = max(cut.iterdir(), key=lambda p: p.stat().st_size)
    data = volume.read_bytes()
    volume.write_bytes(data[: len(data) // 2])
    with pytest.raises(WsiprotoError, match="truncated or corrupt") as err:
        Slide(cut, backend=backend)
    assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_a_folder_without_dicom_is_not_a_slide(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here\n")
    with pytest.raises(WsiprotoError, match="is a directory"):
        Slide(tmp_path)


def test_the_wrong_backend_names_the_right_one(cmu_dicom, cmu_svs):
    with pytest.raises(WsiprotoError, match=r"the dicom reader cannot open it .*--backend "
                                            r"openslide \(or auto\) reads it"):
        Slide(cmu_svs, backend="dicom")
    with pytest.raises(WsiprotoError, match=r"--backend dicom \(or auto\) reads it"):
        Slide(max(cmu_dicom.iterdir(), key=lambda p: p.stat().st_size), backend="tiffslide")
