"""One set of assertions for every registered slide backend (the registry decides who is tested).

Each backend reads the same synthetic slide (conftest's 3-level 4096 x 3072 Aperio pyramid whose
pixels are known) in the form it reads: the file (openslide, tiffslide), a wsidicomizer
conversion (dicom), the file served over HTTP with a token in the query string (remote). A
backend is skipped only when its package is absent; a registered backend without a reference
form here fails, so a new backend is tested the moment it is registered.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from wsiproto.slide import Slide, backend_names
from wsiproto.slide.backends import get_backend
from wsiproto.slide.info import describe

from conftest import SYNTH_H, SYNTH_MPP, SYNTH_W
from slideservers import TOKEN, range_server


def box_down(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    return img[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))


@pytest.fixture(scope="session")
def synthetic_dicom(synthetic_svs, tmp_path_factory):
    """The synthetic slide as a DICOM WSI series (wsidicomizer, tiles kept as they are)."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer (dev extra) absent")
    folder = tmp_path_factory.mktemp("dicom") / "synthetic-dicom"
    wsidicomizer.WsiDicomizer.convert(synthetic_svs[0], folder, tile_size=None)
    return folder


@pytest.fixture(scope="session")
def synthetic_url(synthetic_svs):
    with range_server({"/slides/synthetic.svs": synthetic_svs[0].read_bytes()}) as server:
        yield server.url("/slides/synthetic.svs")


REFERENCES = {
    "openslide": lambda req: req.getfixturevalue("synthetic_svs")[0],
    "tiffslide": lambda req: req.getfixturevalue("synthetic_svs")[0],
    "dicom": lambda req: req.getfixturevalue("synthetic_dicom"),
    "remote": lambda req: req.getfixturevalue("synthetic_url"),
}


@pytest.fixture(params=backend_names())
def opened(request):
    """(backend name, a function opening the reference slide with that backend)."""
    name = request.param
    backend = get_backend(name)
    if not backend.available():
        pytest.skip(f"{name}: its package is not installed ({backend.install})")
    assert name in REFERENCES, f"registered backend {name!r} has no reference slide in this test"
    location = REFERENCES[name](request)
    return name, lambda **kw: Slide(location, backend=name, **kw)


def test_geometry_levels_and_mpp(opened):
    name, open_ = opened
    with open_() as s:
        assert s.backend == name
        assert s.dimensions == s.size == (SYNTH_W, SYNTH_H)
        assert s.level_count == 3
        assert s.level_dimensions == ((4096, 3072), (2048, 1536), (1024, 768))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx(SYNTH_MPP) and s.mpp_source == "vendor"
        assert (s.bounds.x, s.bounds.y) == (0, 0)
        assert s.best_level(3.0) == 1


def test_region_pixels_against_the_written_ones(opened, synthetic_svs):
    _, open_ = opened
    _, render = synthetic_svs
    with open_() as s:
        got = s.read_region((1000, 1200), (512, 384))
        assert got.shape == (384, 512, 3) and got.dtype == np.uint8
        err = np.abs(got.astype(int) - render(1000, 1200, 512, 384).astype(int))
        assert err.mean() < 1.5 and err.max() <= 16  # JPEG q90 on a smooth texture
        shrunk = s.read_region((999, 1201), (300, 200), mpp=1.5)  # level 1, resampled by 1.5
        assert np.abs(shrunk - box_down(render(999, 1201, 900, 600), 3)).mean() < 2.0
        np.testing.assert_array_equal(s.read_region((999, 1201), (300, 200), downsample=3.0),
                                      shrunk)
        level2 = s.read_level(100, 150, 64, 48, level=2)
        assert np.abs(level2 - box_down(render(400, 600, 256, 192), 4)).mean() < 2.0


def test_outside_the_slide_is_one_fill_value(opened):
    _, open_ = opened
    with open_(fill=(10, 20, 30)) as s:
        got = s.read_region((-64, SYNTH_H - 32), (128, 64), mpp=SYNTH_MPP * 2)
        assert (got[:, :32] == (10, 20, 30)).all()
        assert (got[16:, :] == (10, 20, 30)).all()
        assert (got[:16, 32:] != (10, 20, 30)).any(axis=-1).all()
        assert (s.read_region((SYNTH_W + 10, 0), (16, 16)) == (10, 20, 30)).all()


def test_pickle_and_clone_reopen_the_same_slide(opened):
    name, open_ = opened
    with open_(mpp=0.55) as s:
        region = s.read_region((100, 100), (64, 64))
        for copy in (pickle.loads(pickle.dumps(s)), s.clone()):
            with copy:
                assert copy.backend == name and copy.source == s.source
                assert copy.mpp == 0.55 and copy.mpp_source == "user"
                assert copy.native_mpp == pytest.approx(SYNTH_MPP)
                assert copy.identity() == s.identity()
                np.testing.assert_array_equal(copy.read_region((100, 100), (64, 64)), region)


def test_associated_images_and_thumbnail(opened):
    _, open_ = opened
    with open_() as s:
        for image in s.associated_image_names:
            rgb = s.associated_image(image)
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.size
        thumb, ds = s.thumbnail(max_size=256)
        assert thumb.shape == (192, 256, 3) and ds == pytest.approx(16.0)


def test_nothing_shown_holds_a_credential(opened):
    _, open_ = opened
    with open_() as s:
        shown = [s.source, repr(s), json.dumps(s.identity()), json.dumps(describe(s, tissue=False))]
        assert all(TOKEN not in text for text in shown)
