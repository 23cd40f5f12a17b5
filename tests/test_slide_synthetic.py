"""Slide reads on synthetic pyramidal TIFFs whose pixels are known exactly (what every backend
must do is in test_backends_conformance.py; here, what is particular to local TIFF files)."""

from __future__ import annotations

import numpy as np
import pytest

from wsiproto.errors import WsiprotoError
from wsiproto.slide import Slide, detect_tissue, registered
from wsiproto.slide.synthetic import blob_layout, write_pyramidal_tiff

from conftest import SYNTH_H, SYNTH_W

# The registered readers of local SVS files.
BACKENDS = tuple(b.name for b in registered() if "file" in b.kinds and ".svs" in b.suffixes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_metadata(synthetic_svs, backend):
    path, _ = synthetic_svs
    with Slide(path, backend=backend) as s:
        assert s.objective_power == pytest.approx(20.0)
        assert s.vendor == "aperio"
        assert "thumbnail" in s.associated_image_names
        assert s.associated_image("thumbnail").ndim == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_shrinking_reads_in_bands_equal_one_read(synthetic_svs, backend, monkeypatch):
    """A shrinking read larger than the band budget is read band by band of output rows (its
    source never exists whole). With a whole-pixel box (integer scale, aligned) the pixels are
    those of one read; with fractional boxes PIL's fixed-point weights may round a few pixels
    a few levels differently (as moving the read's origin does)."""
    import wsiproto.slide.reader as reader

    path, _ = synthetic_svs
    with Slide(path, backend=backend) as s:
        for loc, size, ds in (((1000, 1202), (700, 523), 2.0), ((-40, 2000), (450, 400), 8.0),
                              ((999.5, 1201), (700, 523), 1.5), ((10.25, 7), (1000, 700), 2.0),
                              ((-40, 2000), (450, 400), 3.3), ((3000, 2500), (400, 300), 2.7)):
            monkeypatch.setattr(reader, "BAND_SOURCE_PIXELS", 1 << 40)
            whole = s.read_region(loc, size, downsample=ds)
            monkeypatch.setattr(reader, "BAND_SOURCE_PIXELS", 20_000)  # bands of a few rows
            banded = s.read_region(loc, size, downsample=ds)
            assert banded.shape == whole.shape == (size[1], size[0], 3)
            diff = np.abs(banded.astype(int) - whole)
            if float(ds).is_integer() and all(float(v).is_integer() for v in loc):
                assert diff.max() == 0, (loc, size, ds)
            assert diff.max() <= 8 and diff.mean() < 0.02, (loc, size, ds)


def test_backends_agree(synthetic_svs):
    path, _ = synthetic_svs
    with Slide(path, backend="openslide") as a, Slide(path, backend="tiffslide") as b:
        for mpp in (None, 1.0, 2.0):
            ra = a.read_region((1500, 700), (256, 256), mpp=mpp)
            rb = b.read_region((1500, 700), (256, 256), mpp=mpp)
            assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 1.0


def test_tissue_detection_matches_layout_and_ignores_pen(synthetic_svs):
    path, render = synthetic_svs
    with Slide(path) as s:
        tm = detect_tissue(s)
    h, w = tm.mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    truth = render.truth((xx + 0.5) * tm.downsample, (yy + 0.5) * tm.downsample)
    iou = (tm.mask & truth).sum() / (tm.mask | truth).sum()
    assert iou > 0.95, iou
    # The green pen stroke on the glass (x 60-95 %, y 82-88 %) is not tissue.
    pen = tm.mask[int(0.83 * h) : int(0.87 * h), int(0.8 * w) : int(0.94 * w)]
    assert pen.size and not pen.any()
    assert tm.mpp == pytest.approx(8.0, rel=0.1)
    assert tm.region_has_tissue(0.3 * SYNTH_W, 0.4 * SYNTH_H, 10, 10)
    assert not tm.region_has_tissue(0.02 * SYNTH_W, 0.02 * SYNTH_H, 50, 50)


def test_mpp_from_tiff_resolution_or_user(tmp_path):
    render = blob_layout(1024, 768)
    generic = write_pyramidal_tiff(tmp_path / "generic.tif", 1024, 768, render, mpp=0.25,
                                   levels=2, aperio=False)
    with Slide(generic, backend="tiffslide") as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.mpp_source in ("vendor", "tiff-resolution")
    none = write_pyramidal_tiff(tmp_path / "nompp.svs", 1024, 768, render, mpp=None, levels=2)
    with Slide(none) as s:
        assert s.mpp is None and s.mpp_source is None
        with pytest.raises(WsiprotoError, match="--mpp"):
            s.require_mpp()
    with Slide(none, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "user"


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile_is_reported_with_coordinates_and_handle_recovers(synthetic_svs, tmp_path,
                                                                       backend):
    import shutil

    import tifffile

    path, _ = synthetic_svs
    bad = tmp_path / "corrupt.svs"
    shutil.copy(path, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # tile (5, 0)
    with open(bad, "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(b"\x00\xff" * ((count - 40) // 2))
    with Slide(bad, backend=backend) as s:
        with pytest.raises(WsiprotoError, match=r"x=1280 y=0 .*level=0"):
            s.read_region((5 * 256, 0), (256, 256))
        # The handle was reopened: a good region reads fine afterwards (OpenSlide latches).
        assert s.read_region((0, 0), (256, 256)).mean() > 200


def test_reads_are_writeable_arrays(synthetic_svs):
    path, _ = synthetic_svs
    with Slide(path) as s:
        for kwargs in ({}, {"mpp": 1.3}):
            region = s.read_region((10, 10), (32, 32), **kwargs)
            region[0, 0] = 0  # callers may normalise or draw in place


def test_a_tiff_under_any_name_opens_without_a_word(synthetic_svs, tmp_path, caplog):
    """Readers are ordered by content where the name says nothing: a TIFF called .scan goes to
    the TIFF readers first, and a reader not made for it failing is not worth a warning."""
    import shutil

    odd = tmp_path / "slide.scan"
    shutil.copy(synthetic_svs[0], odd)
    with caplog.at_level("WARNING"):
        with Slide(odd) as s:
            assert s.backend == BACKENDS[0] and s.level_count == 3
    assert not caplog.records
