"""OME-Zarr label pyramid writer: layout, downsampling, NGFF 0.5 / 0.4 validity, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from wsiproto.errors import WsiprotoError
from wsiproto.export.ngff import (
    SlidePyramidWriter,
    level_shapes,
    mean_downsample,
    mode_downsample,
)

H, W, MPP, CHUNK = 2600, 1500, 0.5, 256
CLASSES = [(1, "TUM", (200, 0, 0)), (2, "STR", (0, 160, 0)), (3, "BACK", (240, 240, 240))]


def synthetic_labels() -> np.ndarray:
    lab = np.zeros((H, W), np.uint8)
    lab[100:900, 200:1300] = 1
    yy, xx = np.ogrid[:H, :W]
    lab[(yy - 1700) ** 2 + (xx - 700) ** 2 < 400**2] = 2
    lab[2300:2500, 100:400] = 3
    return lab


def write_blocks(writer: SlidePyramidWriter, lab: np.ndarray, rows=None) -> None:
    """Write ``lab`` in chunk-aligned blocks of 2x2 chunks (only the given block rows)."""
    step = 2 * CHUNK
    for y0 in range(0, H, step):
        if rows is not None and y0 // step not in rows:
            continue
        for x0 in range(0, W, step):
            writer.write_labels(y0, x0, lab[y0 : y0 + step, x0 : x0 + step])


def make_store(path, version, lab, probabilities=False):
    writer = SlidePyramidWriter(path, height=H, width=W, mpp=MPP, classes=CLASSES,
                                ngff_version=version, chunk=CHUNK,
                                probabilities=probabilities, name="synthetic")
    write_blocks(writer, lab)
    rgb = np.full((CHUNK, CHUNK, 3), (10, 20, 30), np.uint8)
    writer.write_image(0, 0, rgb)
    if probabilities:
        writer.write_probabilities(0, 0, np.full((3, CHUNK, CHUNK), 85, np.uint8))
    writer.build_pyramid(num_workers=2)
    writer.finalize()
    return writer


@pytest.fixture(scope="module")
def label_map():
    return synthetic_labels()


@pytest.fixture(scope="module", params=["0.5", "0.4"])
def store(request, tmp_path_factory, label_map):
    path = tmp_path_factory.mktemp(f"ngff{request.param}") / "slide.ome.zarr"
    make_store(path, request.param, label_map, probabilities=True)
    return path, request.param


def ome_attrs(group, version) -> dict:
    attrs = group.attrs.asdict()
    return attrs["ome"] if version == "0.5" else attrs


def test_mode_downsample_hand_made():
    a = np.array([[1, 1, 2, 0],
                  [2, 0, 0, 0],
                  [3, 3, 5, 5],
                  [0, 0, 5, 4]], np.uint8)
    # majority 1 | 0 has 3 of 4 | tie 3 vs 0 -> the class | majority 5
    np.testing.assert_array_equal(mode_downsample(a), [[1, 0], [3, 5]])
    # ties between classes go to the smaller value; odd edges count only present pixels
    b = np.array([[4, 2, 7], [2, 4, 0]], np.uint8)
    np.testing.assert_array_equal(mode_downsample(b), [[2, 7]])
    assert mode_downsample(np.zeros((3, 3), np.uint8)).tolist() == [[0, 0], [0, 0]]


def test_mean_downsample_rounds_and_handles_odd_edges():
    x = np.array([[[0, 1, 10], [1, 1, 20], [7, 7, 30]]], np.uint8)
    np.testing.assert_array_equal(mean_downsample(x), [[[1, 15], [7, 30]]])


def test_level_shapes_stop_at_1024():
    assert level_shapes(1000, 800) == [(1000, 800)]
    assert level_shapes(5000, 3001) == [(5000, 3001), (2500, 1501), (1250, 751), (625, 376)]


def test_levels_shapes_and_label_values(store, label_map):
    path, _ = store
    g = zarr.open_group(str(path), mode="r")
    shapes = level_shapes(H, W)
    assert len(shapes) == 3
    for k, (h, w) in enumerate(shapes):
        assert g[f"labels/tissue/{k}"].shape == (h, w)
        assert g[str(k)].shape == (3, h, w)
        assert g[f"probabilities/{k}"].shape == (3, h, w)
        assert g[f"labels/tissue/{k}"].dtype == np.uint8
    np.testing.assert_array_equal(g["labels/tissue/0"][...], label_map)
    expect = label_map
    for k in range(1, len(shapes)):
        expect = mode_downsample(expect)
        np.testing.assert_array_equal(g[f"labels/tissue/{k}"][...], expect)
    # the image: written corner averaged down, unwritten glass stays white
    assert g["1"][:, 0, 0].tolist() == [10, 20, 30]
    assert g["1"][:, -1, -1].tolist() == [255, 255, 255]
    assert g["probabilities/2"][:, 0, 0].tolist() == [85, 85, 85]
    assert g["probabilities/2"][:, -1, -1].tolist() == [0, 0, 0]


def test_metadata_scales_colors_and_version(store):
    path, version = store
    g = zarr.open_group(str(path), mode="r")
    root = ome_attrs(g, version)
    ms = root["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][1]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, MPP * 2**k, MPP * 2**k] for k in range(3)]
    labels = ome_attrs(g["labels"], version)
    assert labels["labels"] == ["tissue"]
    tissue = ome_attrs(g["labels/tissue"], version)
    lms = tissue["multiscales"][0]
    assert [d["coordinateTransformations"][0]["scale"] for d in lms["datasets"]] == \
        [s[1:] for s in scales]
    il = tissue["image-label"]
    assert il["source"]["image"] == "../../"
    assert {c["label-value"]: c["rgba"] for c in il["colors"]}[1] == [200, 0, 0, 255]
    assert {p["label-value"]: p["name"] for p in il["properties"]} == \
        {0: "unlabelled", 1: "TUM", 2: "STR", 3: "BACK"}
    if version == "0.5":
        assert labels["version"] == "0.5" and root["version"] == "0.5"
        for key in ("0", "labels/tissue/0", "labels/tissue/2", "probabilities/1"):
            meta = json.loads((path / key / "zarr.json").read_text())
            assert meta["dimension_names"] == (["y", "x"] if "labels" in key else ["c", "y", "x"])
    else:
        assert ms["version"] == "0.4"
        meta = json.loads((path / "labels" / "tissue" / "0" / ".zarray").read_text())
        assert meta["dimension_separator"] == "/"


def test_ome_zarr_reader_finds_image_and_labels(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, _ = store
    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert len(image.data) == 3 and image.data[0].shape == (3, H, W)
    label_nodes = [n for n in nodes if "properties" in n.metadata]
    assert len(label_nodes) == 1
    label = label_nodes[0]
    assert len(label.data) == 3 and label.data[0].shape == (H, W)
    assert label.metadata["properties"][2]["name"] == "STR"
    assert 1 in label.metadata["color"]  # ome-zarr reads the colours from image-label.colors


def test_ome_zarr_models_validate(store):
    path, version = store
    if version == "0.5":
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel
        from ome_zarr_models.v05.labels import Labels
    else:
        from ome_zarr_models.v04.image import Image
        from ome_zarr_models.v04.image_label import ImageLabel
        from ome_zarr_models.v04.labels import Labels
    g = zarr.open_group(str(path), mode="r")
    image = Image.from_zarr(g)
    assert len(image.datasets[0]) == 3
    Labels.from_zarr(g["labels"])
    label = ImageLabel.from_zarr(g["labels/tissue"])
    assert len(label.attributes.ome.multiscales[0].datasets if version == "0.5"
               else label.attributes.multiscales[0].datasets) == 3
    Image.from_zarr(g["probabilities"])


def test_reopen_and_resume(tmp_path, label_map):
    path = tmp_path / "resume.ome.zarr"
    first = SlidePyramidWriter(path, height=H, width=W, mpp=MPP, classes=CLASSES, chunk=CHUNK)
    write_blocks(first, label_map, rows={0, 1})
    again = SlidePyramidWriter.open(path)
    assert (again.height, again.width, again.mpp, again.chunk) == (H, W, MPP, CHUNK)
    assert again.classes == CLASSES and again.ngff_version == "0.5"
    write_blocks(again, label_map, rows={2, 3, 4, 5})
    again.build_pyramid()
    again.finalize()
    np.testing.assert_array_equal(again.read_level(0), label_map)
    assert again.read_level(again.num_levels - 1).shape == level_shapes(H, W)[-1]
    blocks = [(y0, x0, b.shape) for y0, x0, b in again.iter_label_chunks(1)]
    assert blocks[0] == (0, 0, (CHUNK, CHUNK)) and blocks[-1][2] == (1300 - 5 * CHUNK, 750 - 2 * CHUNK)


def test_existing_store_and_bad_input(tmp_path):
    path = tmp_path / "x.ome.zarr"
    SlidePyramidWriter(path, height=100, width=100, mpp=1.0, classes=CLASSES)
    with pytest.raises(WsiprotoError, match="already exists"):
        SlidePyramidWriter(path, height=100, width=100, mpp=1.0, classes=CLASSES)
    w = SlidePyramidWriter(path, height=100, width=100, mpp=1.0, classes=CLASSES,
                           ngff_version="0.4", overwrite=True)
    with pytest.raises(ValueError, match="outside"):
        w.write_labels(90, 0, np.zeros((20, 20), np.uint8))
    with pytest.raises(WsiprotoError, match="not an OME-Zarr store written by wsiproto"):
        SlidePyramidWriter.open(tmp_path / "missing.zarr")
    with pytest.raises(WsiprotoError, match="NGFF version"):
        SlidePyramidWriter(tmp_path / "y", height=9, width=9, mpp=1.0, classes=CLASSES,
                           ngff_version="0.3")


def test_mode_downsample_fast_paths_match_the_plain_rule():
    """The lookup-table path (< 16 values), the scoring path (other values) and odd edges give
    what the plain rule (count, then non-zero, then smaller value) gives."""
    from wsiproto.export.ngff import _mode_general

    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        top = int(rng.choice([2, 5, 16, 256]))
        lab = rng.integers(0, top, (h, w)).astype(np.uint8)
        np.testing.assert_array_equal(mode_downsample(lab), _mode_general(lab), err_msg=str(trial))


@pytest.mark.parametrize("probabilities", [False, True])
def test_blocks_with_inline_levels_equal_the_pyramid_built_afterwards(tmp_path, probabilities):
    """write_block(levels=k) fills levels 1..k from each block, build_pyramid(start=k+1) the
    rest: the same arrays as writing level 0 and building every level from it."""
    h, w, block = 1900, 2300, 4 * CHUNK  # odd edges, blocks of 4x4 zarr chunks
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 4, (h // 8 + 1, w // 8 + 1)).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    lab = lab[:h, :w].copy()
    lab[rng.random((h, w)) < 0.05] = 2
    rgb = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
    probs = rng.integers(0, 255, (len(CLASSES), h, w)).astype(np.uint8)
    kw = {"height": h, "width": w, "mpp": MPP, "classes": CLASSES, "chunk": CHUNK,
          "probabilities": probabilities}
    inline = SlidePyramidWriter(tmp_path / "inline.ome.zarr", **kw)
    plain = SlidePyramidWriter(tmp_path / "plain.ome.zarr", **kw)
    levels = inline.inline_levels(block)
    assert levels == 2 and inline.num_levels == 3
    skipped = {(block, 0)}  # a block without tissue is never written
    for y0 in range(0, h, block):
        for x0 in range(0, w, block):
            if (y0, x0) in skipped:
                continue
            ys, xs = slice(y0, y0 + block), slice(x0, x0 + block)
            p = probs[:, ys, xs] if probabilities else None
            inline.write_block(y0, x0, lab[ys, xs], rgb=rgb[ys, xs], probs=p, levels=levels)
            plain.write_block(y0, x0, lab[ys, xs], rgb=rgb[ys, xs], probs=p, levels=0)
    inline.build_pyramid(start=levels + 1)
    plain.build_pyramid()
    for k in range(inline.num_levels):
        np.testing.assert_array_equal(inline.read_level(k), plain.read_level(k))
        np.testing.assert_array_equal(inline.image_array(k)[...], plain.image_array(k)[...])
        if probabilities:
            np.testing.assert_array_equal(inline.probability_array(k)[...],
                                          plain.probability_array(k)[...])
    with pytest.raises(ValueError, match="aligned"):
        inline.write_block(CHUNK, 0, lab[:CHUNK, :CHUNK], levels=2)
