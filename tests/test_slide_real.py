"""Real slides from ../shared/data/slides (skipped with a reason where absent)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsiproto.errors import WsiprotoError
from wsiproto.slide import Slide, detect_tissue, registered, tissue_mask_from_rgb

from conftest import shared_data, shared_file

# The registered readers of local SVS files.
SVS_BACKENDS = tuple(b.name for b in registered() if "file" in b.kinds and ".svs" in b.suffixes)


def test_cmu_small_region_both_backends():
    path = shared_file("slides", "CMU-1-Small-Region.svs")
    for backend in SVS_BACKENDS:
        with Slide(path, backend=backend) as s:
            assert s.dimensions == (2220, 2967)
            assert s.level_count == 1
            assert s.mpp == pytest.approx(0.499)
            assert s.mpp_source == "vendor"
            assert s.objective_power == pytest.approx(20)
            assert s.vendor == "aperio"
            assert {"label", "macro", "thumbnail"} <= set(s.associated_image_names)


def test_tcga_two_levels_jpeg2000_no_mpp():
    path = shared_file("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    for backend in SVS_BACKENDS:
        with Slide(path, backend=backend) as s:
            assert s.dimensions == (4443, 3567)
            assert s.level_count == 2
            assert s.level_dimensions[1] == (2221, 1783)
            assert s.mpp is None
            with pytest.raises(WsiprotoError, match="--mpp"):
                s.require_mpp()
            # JPEG 2000 tiles decode: the centre of the section is stained tissue.
            centre = s.read_region((2000, 1600), (256, 256))
            assert centre.std() > 5 and centre.mean() < 230
    with Slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "user"
        level1 = s.read_region((0, 0), (512, 512), mpp=1.0)  # served from level 1
        assert level1.shape == (512, 512, 3)


@pytest.mark.parametrize("name,region,mpp", [
    ("CMU-1-Small-Region.svs", (600, 900), None),
    ("CMU-1-Small-Region.svs", (601, 901), 1.3),
    ("TCGA-CR-7395-01A-01-TS1.svs", (1800, 1500), None),
])
def test_backends_agree_pixelwise_on_real_slides(name, region, mpp):
    path = shared_file("slides", name)
    kwargs = {} if mpp is None else {"mpp": mpp}
    reads = []
    for backend in SVS_BACKENDS:
        with Slide(path, backend=backend) as s:
            reads.append(s.read_region(region, (384, 384), **kwargs).astype(int))
    diff = np.abs(reads[0] - reads[1])
    # Different JPEG / JPEG 2000 decoders: small differences only.
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12


def test_tissue_on_real_slides():
    cmu = shared_file("slides", "CMU-1-Small-Region.svs")
    with Slide(cmu) as s:
        tm = detect_tissue(s)
    assert 0.15 < tm.fraction < 0.5  # a strip of skin on a mostly empty glass
    tcga = shared_file("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    with Slide(tcga) as s:
        tm = detect_tissue(s)
    assert 0.45 < tm.fraction < 0.8  # a whole section filling most of the scan
    assert tm.mpp is None and tm.mask.shape[1] == 2048


@pytest.mark.parametrize("name,lo,hi", [
    ("no-tissue.png", 0.0, 0.01),
    ("no-tissue2.png", 0.0, 0.01),
    ("no-tissue-line.png", 0.0, 0.01),
    ("almost-white-1.png", 0.0, 0.01),
    ("almost-white-2.png", 0.0, 0.08),  # a corner of real tissue (top right)
    ("no-tissue-green-pen.png", 0.0, 0.02),
    ("no-tissue-red-pen.png", 0.0, 0.45),  # red ink dropped; its dark core remains
    ("medium-nuclei-score-green-pen-level1.png", 0.3, 0.7),  # ink removed, tissue kept
    ("high-nuclei-score-level0.png", 0.9, 1.0),
    ("medium-nuclei-score-level1-2.png", 0.9, 1.0),
    ("tissue-level0-7352-11762-7864-12274.png", 0.6, 1.0),
])
def test_tissue_on_real_tiles(name, lo, hi):
    path = shared_file("tiles", "histolab", name)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    frac = tissue_mask_from_rgb(rgb).mean()
    assert lo <= frac <= hi, frac


def test_red_pen_pixels_are_not_tissue():
    path = shared_file("tiles", "histolab", "no-tissue-red-pen.png")
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red_ink = (rgb[..., 0] > rgb[..., 2] + 60) & (rgb[..., 2] - rgb[..., 1] < 25)
    mask = tissue_mask_from_rgb(rgb.astype(np.uint8))
    assert red_ink.mean() > 0.2
    # Morphological closing may re-add a rim of ink where it touches tissue; no more.
    assert (mask & red_ink).sum() / red_ink.sum() < 0.15


def test_shared_data_location_is_documented():
    # Not a skip: the lookup itself must point beside the checkout (or to the env var).
    assert shared_data().name == "data"
