"""Dataset readers and transforms: synthetic BCSS-WSSS / LUAD-HistoSeg / generic trees, error
messages, pickling, and the real WSSS4LUAD examples."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from PIL import Image

from wsiproto.classes import get_class_table
from wsiproto.data import (
    BCSS_MEAN,
    BCSS_STD,
    EvalTransform,
    LabelledPatches,
    MaskedPatches,
    TrainTransform,
    detect_kind,
    open_dataset,
    parse_label,
)
from wsiproto.data.transforms import (
    denormalise,
    flip_rotate,
    random_crop,
    random_flip_rotate,
)
from wsiproto.errors import WsiprotoError

BCSS_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]
LUAD_PALETTE = [(205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255)]


def write_rgb(path: Path, w: int = 32, h: int = 24, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_mask(path: Path, mask: np.ndarray, palette) -> None:
    """A palette PNG whose indices are ``mask`` (colours deliberately not the index values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([v for rgb in palette for v in rgb] + [0] * (768 - 3 * len(palette)))
    im.save(path)


def make_mask(w: int, h: int, n_values: int, seed: int = 0) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, n_values, (h, w)).astype(np.uint8)
    mask[0, :n_values] = np.arange(n_values)  # every value present
    return mask


BCSS_TRAIN = {
    "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png": [1, 1, 0, 1],
    "TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.2500+1[0100].png": [0, 1, 0, 0],
    "TCGA-AR-A1AQ-DX1_xmin18171_ymin38296_MPP-0.2500+2[0011].png": [0, 0, 1, 1],
}


def make_bcss(root: Path, train: str = "train", val: str = "val", palette=BCSS_PALETTE,
              train_names=BCSS_TRAIN, with_test: bool = True) -> dict[str, np.ndarray]:
    for i, name in enumerate(train_names):
        write_rgb(root / train / name, seed=i)
    masks = {}
    splits = [val, "test"] if with_test else [val]
    for split in splits:
        for i in range(2):
            stem = f"{split}_{i:02d}"
            write_rgb(root / split / "img" / f"{stem}.png", w=40, h=30, seed=10 + i)
            masks[f"{split}/{stem}"] = make_mask(40, 30, 5, seed=i)
            write_mask(root / split / "mask" / f"{stem}.png", masks[f"{split}/{stem}"], palette)
    return masks


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


# --- BCSS-WSSS layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("train,val", [("train", "val"), ("training", "valid"), ("train/img", "val")])
def test_bcss_layout_variants(tmp_path, train, val):
    masks = make_bcss(tmp_path, train=train, val=val)
    assert detect_kind(tmp_path) == "bcss"
    ds = open_dataset(tmp_path, "train")
    assert isinstance(ds, LabelledPatches) and ds.table is get_class_table("bcss")
    assert ds.kind == "bcss" and len(ds) == 3
    by_name = {Path(p).name: ds.labels[i].tolist() for i, p in enumerate(ds.paths)}
    assert by_name == {k: [float(v) for v in vs] for k, vs in BCSS_TRAIN.items()}
    rgb, labels = ds[0]
    assert rgb.dtype == np.uint8 and rgb.shape == (24, 32, 3)
    assert labels.dtype == np.float32 and labels.shape == (4,)
    assert ds.class_counts().tolist() == [1, 2, 1, 2]

    for split in ("val", "test"):
        ev = open_dataset(tmp_path, split)
        assert isinstance(ev, MaskedPatches) and len(ev) == 2 and ev.num_classes == 4
        rgb, mask = ev[1]
        assert rgb.shape == (30, 40, 3) and mask.dtype == np.int64 and mask.shape == (30, 40)
        folder = val if split == "val" else "test"
        np.testing.assert_array_equal(mask, masks[f"{folder}/{folder}_01"])  # palette indices, background = 4
        assert mask.max() == 4


def test_split_aliases_and_kind_argument(tmp_path):
    make_bcss(tmp_path)
    assert len(open_dataset(tmp_path, "training", kind="bcss-wsss")) == 3
    assert len(open_dataset(tmp_path, "validation", kind="bcss")) == 2


def test_detect_from_mask_palette_without_train(tmp_path):
    make_bcss(tmp_path, with_test=False)
    import shutil

    shutil.rmtree(tmp_path / "train")
    assert detect_kind(tmp_path) == "bcss"
    assert open_dataset(tmp_path, "val").kind == "bcss"


# --- LUAD-HistoSeg ----------------------------------------------------------------------------

def test_luad_histoseg(tmp_path):
    names = {"patient1_500_500-[1 0 0 1].png": [1, 0, 0, 1], "p2_0_0-[0 1 1 0].png": [0, 1, 1, 0]}
    masks = make_bcss(tmp_path, palette=LUAD_PALETTE, train_names=names)
    assert detect_kind(tmp_path) == "luad-histoseg"
    ds = open_dataset(tmp_path, "train")
    assert ds.table.names == ["TE", "NEC", "LYM", "TAS"]
    assert {Path(p).name: ds.labels[i].tolist() for i, p in enumerate(ds.paths)} == {
        k: [float(v) for v in vs] for k, vs in names.items()}
    ev = open_dataset(tmp_path, "test")
    _, mask = ev[0]
    np.testing.assert_array_equal(mask, masks["test/test_00"])
    # without training names, the LUAD-HistoSeg mask palette identifies the layout too
    import shutil

    shutil.rmtree(tmp_path / "train")
    assert detect_kind(tmp_path) == "luad-histoseg"


def test_parse_label_spellings():
    assert parse_label("a+0[1101].png", 4).tolist() == [1, 1, 0, 1]
    assert parse_label("a-[1 0 0 1].png", 4).tolist() == [1, 0, 0, 1]
    assert parse_label("a-[1, 0, 1].png", 3).tolist() == [1, 0, 1]
    for bad in ("a.png", "a-[1 0 2 1].png", "a-[1 0 1].png", "a-[].png"):
        with pytest.raises(WsiprotoError) as err:
            parse_label(bad, 4, kind="luad-histoseg")
        assert_one_line(err, bad, "cannot parse", "[1 0 0 1]")


# --- generic CSV ------------------------------------------------------------------------------

def make_generic(root: Path, split_column: bool = True) -> dict[str, np.ndarray]:
    rows = ["image,split,tumor,stroma,normal"] if split_column else ["image,tumor,stroma,normal"]
    masks = {}
    for i in range(4):
        name = f"patches/p{i}.jpg"
        write_rgb(root / name, w=20, h=16, seed=i)
        split = "train" if i < 2 else "val"
        labels = [(i + j) % 2 for j in range(3)]
        rows.append(",".join([name, split] if split_column else [name]) + "," + ",".join(map(str, labels)))
        if split == "val":
            masks[f"p{i}"] = make_mask(20, 16, 4, seed=i)
            write_mask(root / "masks" / f"p{i}.png", masks[f"p{i}"], get_class_table("wsss4luad").palette())
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return masks


def test_generic_csv(tmp_path):
    masks = make_generic(tmp_path)
    assert detect_kind(tmp_path) == "generic"
    train = open_dataset(tmp_path, "train")
    assert train.kind == "generic" and train.table is get_class_table("wsss4luad")  # columns match
    assert train.labels.tolist() == [[0, 1, 0], [1, 0, 1]]
    assert train[1][0].shape == (16, 20, 3)
    val = open_dataset(tmp_path, "val", csv="labels.csv")
    assert isinstance(val, MaskedPatches) and len(val) == 2
    np.testing.assert_array_equal(val[0][1], masks["p2"])
    assert val.labels.tolist() == [[0, 1, 0], [1, 0, 1]]


def test_generic_custom_classes_and_explicit_table(tmp_path):
    write_rgb(tmp_path / "a.png")
    (tmp_path / "lab.csv").write_text("image,fat,muscle\na.png,1,0\n")
    ds = open_dataset(tmp_path, "train", kind="generic", csv=tmp_path / "lab.csv")
    assert ds.table.names == ["fat", "muscle"] and ds.labels.tolist() == [[1, 0]]
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train", csv="lab.csv", classes="bcss")
    assert_one_line(err, "lab.csv", "TUM")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "val", csv="lab.csv")
    assert_one_line(err, "lab.csv", "masks")


def test_generic_bad_label_names_row(tmp_path):
    make_generic(tmp_path, split_column=False)
    path = tmp_path / "labels.csv"
    path.write_text(path.read_text().replace("patches/p1.jpg,1,0,1", "patches/p1.jpg,1,x,1"))
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train")
    assert_one_line(err, "labels.csv", "p1.jpg", "stroma")


# --- errors -----------------------------------------------------------------------------------

def test_unparseable_training_label(tmp_path):
    make_bcss(tmp_path)
    write_rgb(tmp_path / "train" / "TCGA-XX_xmin1_ymin2+0[11x1].png")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train", kind="bcss")
    assert_one_line(err, "TCGA-XX_xmin1_ymin2+0[11x1].png", "cannot parse", "+0[1101]")


def test_mask_size_mismatch(tmp_path):
    make_bcss(tmp_path)
    bad = tmp_path / "val" / "mask" / "val_01.png"
    write_mask(bad, make_mask(41, 30, 5), BCSS_PALETTE)
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "val")
    assert_one_line(err, str(bad), "41x30", "40x30")
    ds = open_dataset(tmp_path, "val", check_sizes=False)  # ... and again when the item loads
    ds[0]
    with pytest.raises(WsiprotoError) as err:
        ds[1]
    assert_one_line(err, str(bad), "41x30")


def test_mask_value_out_of_range(tmp_path):
    make_bcss(tmp_path)
    bad = tmp_path / "test" / "mask" / "test_00.png"
    mask = make_mask(40, 30, 5)
    mask[3, 3] = 9
    write_mask(bad, mask, BCSS_PALETTE)
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "test")[0]
    assert_one_line(err, str(bad), "mask value 9")


def test_empty_splits(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train", kind="bcss")
    assert_one_line(err, str(tmp_path / "train"), "empty split")
    (tmp_path / "val" / "img").mkdir(parents=True)
    (tmp_path / "val" / "mask").mkdir()
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "val", kind="bcss")
    assert_one_line(err, str(tmp_path / "val" / "img"), "empty split")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "test", kind="bcss")
    assert_one_line(err, str(tmp_path), "no test folder")


def test_unknown_layout_and_arguments(tmp_path):
    write_rgb(tmp_path / "something" / "a.png")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train")
    assert_one_line(err, str(tmp_path), "unknown dataset layout", "kind=")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "train", kind="camelyon")
    assert_one_line(err, "camelyon")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "dev")
    assert_one_line(err, "dev")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path / "nope", "train")
    assert_one_line(err, "nope", "not found")


def test_image_without_mask_and_corrupt_image(tmp_path, caplog):
    make_bcss(tmp_path)
    write_rgb(tmp_path / "val" / "img" / "lonely.png")
    with pytest.raises(WsiprotoError) as err:
        open_dataset(tmp_path, "val")
    assert_one_line(err, "lonely.png", "no mask")
    (tmp_path / "val" / "img" / "lonely.png").unlink()
    write_mask(tmp_path / "val" / "mask" / "orphan.png", make_mask(8, 8, 5), BCSS_PALETTE)
    with caplog.at_level(logging.WARNING, logger="wsiproto.data.datasets"):
        assert len(open_dataset(tmp_path, "val")) == 2
    assert "orphan.png" in caplog.text
    broken = tmp_path / "train" / "broken+0[1000].png"
    broken.write_bytes(b"not a png")
    ds = open_dataset(tmp_path, "train")
    with pytest.raises(WsiprotoError) as err:
        ds[[Path(p).name for p in ds.paths].index(broken.name)]
    assert_one_line(err, str(broken), "not a readable image")


# --- pickling, transforms ---------------------------------------------------------------------

def test_pickle_round_trip_and_torch_free(tmp_path):
    import subprocess
    import sys

    make_bcss(tmp_path)
    for split in ("train", "val"):
        ds = open_dataset(tmp_path, split, transform=TrainTransform(size=16, seed=0))
        clone = pickle.loads(pickle.dumps(ds))
        assert type(clone) is type(ds) and clone.paths == ds.paths and clone.table == ds.table
        assert len(clone) == len(ds)
        a, b = ds[0][1], clone[0][1]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    code = ("import sys, wsiproto.data as d; d.open_dataset(sys.argv[1], 'val')[0]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


def test_flip_rotate_applies_to_mask():
    image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    mask = image[..., 0].astype(np.int64)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(64):
        im2, m2 = random_flip_rotate(image, mask, rng)
        np.testing.assert_array_equal(im2[..., 0], m2)
        seen.add(im2.tobytes())
    assert len(seen) == 8  # all dihedral transforms occur
    im2, _ = flip_rotate(image, None, 1, False)
    assert im2.shape == (4, 6, 3)


def test_random_crop_and_upscale():
    image = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    mask = (image[..., 0] % 4).astype(np.int64)
    im2, m2 = random_crop(image, mask, 224, np.random.default_rng(1))
    assert im2.shape == (224, 224, 3) and m2.shape == (224, 224)
    # the crop is a window of the original, image and mask at the same place
    hits = np.argwhere((image[..., 0] == im2[0, 0, 0]) & (image[..., 1] == im2[0, 0, 1]))
    assert any(np.array_equal(image[y:y + 224, x:x + 224], im2) and np.array_equal(mask[y:y + 224, x:x + 224], m2)
               for y, x in hits)
    small = image[:174, :248]
    im3, m3 = random_crop(small, mask[:174, :248], 224)
    assert im3.shape == (224, 224, 3) and m3.shape == (224, 224)
    assert set(np.unique(m3)) <= set(np.unique(mask))


def test_train_and_eval_transforms(tmp_path):
    torch = pytest.importorskip("torch")
    make_bcss(tmp_path)
    ds = open_dataset(tmp_path, "train", transform=TrainTransform(size=16, seed=0))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.float32
    val = open_dataset(tmp_path, "val", transform=TrainTransform(size=16, resize="resize", seed=0))
    x, m = val[0]
    assert x.shape == (3, 16, 16) and m.shape == (16, 16) and m.dtype == torch.int64
    raw_rgb, raw_mask = open_dataset(tmp_path, "val")[0]
    ev = open_dataset(tmp_path, "val", transform=EvalTransform())
    x, m = ev[0]
    assert x.shape == (3, 30, 40)
    np.testing.assert_array_equal(m.numpy(), raw_mask)
    np.testing.assert_array_equal(denormalise(x, BCSS_MEAN, BCSS_STD), raw_rgb)
    expected = (raw_rgb[0, 0, 0] / 255 - BCSS_MEAN[0]) / BCSS_STD[0]
    assert abs(float(x[0, 0, 0]) - expected) < 1e-5
    loader = torch.utils.data.DataLoader(
        open_dataset(tmp_path, "train", transform=TrainTransform(size=16)), batch_size=3,
        num_workers=1)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 3, 16, 16) and yb.shape == (3, 4)
    with pytest.raises(WsiprotoError):
        TrainTransform(std=(0.1, 0.0, 0.1))


# --- real WSSS4LUAD ---------------------------------------------------------------------------

def test_wsss4luad_real_train_examples():
    root = shared_file("wsss4luad")
    shared_file("wsss4luad", "train-examples")
    assert detect_kind(root) == "wsss4luad"
    ds = open_dataset(root, "train")
    assert ds.table.names == ["tumor", "stroma", "normal"]
    labels = {Path(p).name: ds.labels[i].tolist() for i, p in enumerate(ds.paths)}
    assert labels == {
        "1003370-5631-18822-[0, 1, 0].png": [0, 1, 0],
        "436219-7159-48057-[1, 0, 0].png": [1, 0, 0],
        "436219-9328-56427-[1, 1, 0].png": [1, 1, 0],
        "449636-23526-9666-[0, 0, 1].png": [0, 0, 1],
    }
    rgb, lab = ds[0]
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and lab.shape == (3,)


def test_wsss4luad_real_val(caplog):
    root = shared_file("wsss4luad")
    shared_file("wsss4luad", "val", "mask")
    with caplog.at_level(logging.WARNING, logger="wsiproto.data.datasets"):
        ds = open_dataset(root, "val")  # checks every pair's size from the headers
    assert "9 mask(s) without an image" in caplog.text
    assert len(ds) == 31 and ds.table.background_index == 3
    assert [Path(p).stem for p in ds.paths] == [Path(p).stem for p in ds.mask_paths]
    values = set()
    for i in range(len(ds)):
        rgb, mask = ds[i]
        assert rgb.shape[:2] == mask.shape and mask.dtype == np.int64
        values |= set(np.unique(mask).tolist())
    assert values <= {0, 1, 2, 3} and 3 in values and {0, 1, 2} <= values
