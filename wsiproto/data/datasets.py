"""Patch datasets for training (image-level labels) and evaluation (pixel masks).

Readers for the three public weakly supervised tissue segmentation datasets and a generic
CSV layout. Everything here is torch-free and picklable: a dataset is plain lists of file paths
(strings), a numpy label array and its :class:`~wsiproto.classes.ClassTable`; images are read
lazily with PIL in ``__getitem__``, so DataLoader workers can be spawned cheaply.

Items:

* training split (:class:`LabelledPatches`): ``(rgb uint8 [H, W, 3], labels float32 [C])``
* val/test splits (:class:`MaskedPatches`): ``(rgb uint8 [H, W, 3], mask int64 [H, W])`` with
  background = ``C`` (the table's ``background_index``).

A ``transform`` (e.g. :class:`wsiproto.data.transforms.TrainTransform`) is called as
``transform(rgb, target)`` and its result returned instead, when given.

Layouts (:func:`open_dataset`):

* **BCSS-WSSS**: ``train/*.png`` (also ``training/`` and ``train/img/``) named
  ``...+0[1101].png`` = [TUM, STR, LYM, NEC]; ``val/{img,mask}`` (or ``valid/``) and
  ``test/{img,mask}``; palette masks 0..3 tissue, 4 background.
* **LUAD-HistoSeg**: the same folders, labels ``...-[1 0 0 1].png`` = [TE, NEC, LYM, TAS].
* **WSSS4LUAD**: labels ``...-[1, 0, 0].png`` = [tumor, stroma, normal]; folders as above or
  the challenge's ``1.training``, ``2.validation``, ``3.testing`` (and ``train-examples``);
  masks 0..2, 3 background. Masks without an image are skipped with a warning.
* **generic**: a folder of patches plus a CSV with an ``image`` column (path relative to the
  CSV's folder, or the root) and one 0/1 column per class; an optional ``split`` column; an
  optional mask folder (``masks/`` or ``mask/``, same stem ``.png``) or ``mask`` column.
"""

from __future__ import annotations

import csv as _csv
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiproto.classes import ClassTable, get_class_table
from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
KINDS = ("bcss", "luad-histoseg", "wsss4luad", "generic")
SPLITS = ("train", "val", "test")

# Folder names a split may have, in order of preference.
SPLIT_DIRS = {
    "train": ("train", "training", "1.training", "train-examples"),
    "val": ("val", "valid", "validation", "2.validation"),
    "test": ("test", "testing", "3.testing"),
}
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}

# Label spelling in training file names, per layout (for messages and auto-detection).
LABEL_EXAMPLES = {
    "bcss": "name+0[1101].png",
    "luad-histoseg": "name-[1 0 0 1].png",
    "wsss4luad": "name-[1, 0, 0].png",
}
_LABEL_RE = re.compile(r"\[([^\[\]]*)\]\s*$")


# --- low-level readers ------------------------------------------------------------------------

def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except FileNotFoundError:
        raise WsiprotoError("file not found", path=path,
                            hint="the dataset changed on disk; open it again") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise WsiprotoError(f"not a readable image ({exc.__class__.__name__})", path=path,
                            hint="re-copy or remove the file") from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``uint8 [H, W, 3]``."""
    path = str(path)
    with _open_image(path) as im:
        try:
            return np.array(im.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise WsiprotoError(f"truncated or corrupt image ({exc})", path=path,
                                hint="re-copy or remove the file") from None


def read_mask(path: str | Path, table: ClassTable) -> np.ndarray:
    """A label mask as ``int64 [H, W]`` of class indices, background = ``table.num_classes``.

    Palette (``P``) and greyscale PNGs are read as stored indices, never through their colours.
    An RGB mask is mapped through the table's palette (classes, then background); a colour
    outside it is an error. Values above the background index are an error.
    """
    path = str(path)
    with _open_image(path) as im:
        try:
            if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                mask = np.array(im).astype(np.int64)
            elif im.mode in ("RGB", "RGBA"):
                mask = _rgb_mask_to_index(np.array(im.convert("RGB")), table, path)
            else:
                raise WsiprotoError(f"unsupported mask mode {im.mode}", path=path,
                                    hint="save masks as palette (P) or greyscale PNGs of class indices")
        except OSError as exc:
            raise WsiprotoError(f"truncated or corrupt mask ({exc})", path=path,
                                hint="re-copy or remove the file") from None
    top = int(mask.max()) if mask.size else 0
    if top > table.background_index or (mask.size and int(mask.min()) < 0):
        raise WsiprotoError(
            f"mask value {top} outside 0..{table.background_index} "
            f"({table.num_classes} classes of table {table.name!r}, background {table.background_index})",
            path=path, hint="check that the mask belongs to this dataset and class table")
    return mask


def _rgb_mask_to_index(rgb: np.ndarray, table: ClassTable, path: str) -> np.ndarray:
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette = np.array([(r << 16) | (g << 8) | b for r, g, b in table.palette()], dtype=np.int64)
    order = np.argsort(palette)
    pos = np.searchsorted(palette[order], codes).clip(0, len(palette) - 1)
    found = palette[order][pos] == codes
    if not found.all():
        bad = rgb[~found][0]
        raise WsiprotoError(f"RGB mask colour {tuple(int(v) for v in bad)} is not in the "
                            f"{table.name!r} palette {table.palette()}", path=path,
                            hint="save masks as palette PNGs of class indices")
    return order[pos].astype(np.int64)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (no pixel decoding)."""
    with _open_image(str(path)) as im:
        return im.size


def parse_label(path: str | Path, num_classes: int, *, kind: str | None = None) -> np.ndarray:
    """The image-level label in a file name, ``[1101]``, ``[1 0 0 1]`` or ``[1, 0, 0]``, as float32.

    Raises :class:`WsiprotoError` naming the file when the name has no bracketed label, a value
    is not 0/1 or the count differs from ``num_classes``.
    """
    path = Path(path)
    example = LABEL_EXAMPLES.get(kind or "", None)
    hint = (f"name training files like {example}" if example
            else f"end the file name with [..] holding {num_classes} 0/1 values")
    match = _LABEL_RE.search(path.stem)
    if match is None:
        raise WsiprotoError("cannot parse the image-level label: no [..] at the end of the name",
                            path=path, hint=hint)
    body = match.group(1).strip()
    tokens = [t for t in re.split(r"[,\s]+", body) if t] if re.search(r"[,\s]", body) else list(body)
    if len(tokens) != num_classes or any(t not in ("0", "1") for t in tokens):
        raise WsiprotoError(
            f"cannot parse the image-level label [{body}]: expected {num_classes} values of 0/1",
            path=path, hint=hint)
    return np.array([float(t) for t in tokens], dtype=np.float32)


# --- datasets ---------------------------------------------------------------------------------

class _Patches:
    """What both dataset kinds share: image paths, class table, split description, transform."""

    def __init__(self, paths: Sequence[str | Path], table: ClassTable, *, kind: str, split: str,
                 root: str | Path | None,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None):
        self.paths = [str(p) for p in paths]
        self.table = get_class_table(table)
        self.kind, self.split = kind, split
        self.root = None if root is None else str(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.table.names})")


class LabelledPatches(_Patches):
    """Training patches with image-level labels: items ``(rgb uint8 [H, W, 3], labels float32 [C])``."""

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray, table: ClassTable, *,
                 kind: str = "generic", split: str = "train", root: str | Path | None = None,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None):
        super().__init__(paths, table, kind=kind, split=split, root=root, transform=transform)
        self.labels = np.asarray(labels, dtype=np.float32).reshape(len(self.paths), -1)
        if self.labels.shape[1] != self.table.num_classes:
            raise WsiprotoError(f"labels have {self.labels.shape[1]} columns, class table "
                                f"{self.table.name!r} has {self.table.num_classes} classes")

    def __getitem__(self, index: int):
        rgb = read_rgb(self.paths[index])
        labels = self.labels[index].copy()
        return self.transform(rgb, labels) if self.transform is not None else (rgb, labels)

    def class_counts(self) -> np.ndarray:
        """Number of patches carrying each class (``int64 [C]``)."""
        return self.labels.sum(axis=0).astype(np.int64)


class MaskedPatches(_Patches):
    """Evaluation patches with pixel masks: items ``(rgb uint8 [H, W, 3], mask int64 [H, W])``.

    The mask's background value is ``table.num_classes``. Image and mask sizes are compared when
    an item is loaded (and, by :func:`open_dataset`, from the file headers beforehand).
    """

    def __init__(self, image_paths: Sequence[str | Path], mask_paths: Sequence[str | Path],
                 table: ClassTable, *, kind: str = "generic", split: str = "val",
                 root: str | Path | None = None, labels: np.ndarray | None = None,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None):
        super().__init__(image_paths, table, kind=kind, split=split, root=root,
                         transform=transform)
        self.mask_paths = [str(p) for p in mask_paths]
        if len(self.paths) != len(self.mask_paths):
            raise WsiprotoError(f"{len(self.paths)} images but {len(self.mask_paths)} masks")
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)

    def __getitem__(self, index: int):
        rgb = read_rgb(self.paths[index])
        mask = read_mask(self.mask_paths[index], self.table)
        if mask.shape != rgb.shape[:2]:
            raise _size_error(self.mask_paths[index], mask.shape[::-1], rgb.shape[1::-1],
                              self.paths[index])
        return self.transform(rgb, mask) if self.transform is not None else (rgb, mask)

    def check_sizes(self) -> None:
        """Compare every image's and mask's size from the file headers (cheap, no decoding)."""
        for image, mask in zip(self.paths, self.mask_paths):
            ms, im = image_size(mask), image_size(image)
            if ms != im:
                raise _size_error(mask, ms, im, image)


def _size_error(mask: str, mask_size, image_size_, image: str) -> WsiprotoError:
    return WsiprotoError(
        f"mask is {mask_size[0]}x{mask_size[1]} but its image {Path(image).name} is "
        f"{image_size_[0]}x{image_size_[1]}", path=mask,
        hint="masks must have their image's pixel size; re-export the mask or remove the pair")


# --- layouts ----------------------------------------------------------------------------------

def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _train_folder(root: Path) -> Path | None:
    folder = _split_dir(root, "train")
    if folder is not None and (folder / "img").is_dir():
        folder = folder / "img"
    return folder


def _norm_split(split: str) -> str:
    key = str(split).strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise WsiprotoError(f"unknown split {split!r}", hint="choose train, val or test")
    return key


def _norm_kind(kind: str) -> str:
    key = str(kind).strip().lower()
    key = {"bcss-wsss": "bcss", "luad": "luad-histoseg", "csv": "generic"}.get(key, key)
    if key not in ("auto", *KINDS):
        raise WsiprotoError(f"unknown dataset kind {kind!r}", hint=f"choose auto, {', '.join(KINDS)}")
    return key


def _kind_from_label(name: str) -> str | None:
    match = _LABEL_RE.search(Path(name).stem)
    if match is None:
        return None
    body = match.group(1).strip()
    if "," in body:
        return "wsss4luad" if len([t for t in re.split(r"[,\s]+", body) if t]) == 3 else None
    if re.search(r"\s", body):
        return "luad-histoseg" if len(body.split()) == 4 else None
    return "bcss" if len(body) == 4 else None


def _kind_from_palette(mask_path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(mask_path) as im:
            flat = im.getpalette() if im.mode == "P" else None
    except OSError:
        return None
    if not flat:
        return None
    colours = [tuple(flat[i:i + 3]) for i in range(0, len(flat) - 2, 3)]
    for kind in ("bcss", "luad-histoseg", "wsss4luad"):
        table = get_class_table(kind)
        if colours[:table.num_classes] == list(table.colours):
            return kind
    return None


def detect_kind(root: str | Path, csv: str | Path | None = None) -> str:
    """The layout of a dataset folder: from the labels in training file names, else the palette
    of the first val/test mask, else ``generic`` when a CSV is given or lies in the root."""
    root = Path(root)
    if csv is not None:
        return "generic"
    train = _train_folder(root)
    if train is not None:
        for path in _images_in(train)[:50]:
            kind = _kind_from_label(path.name)
            if kind is not None:
                return kind
    for split in ("val", "test"):
        folder = _split_dir(root, split)
        if folder is not None and (folder / "mask").is_dir():
            masks = _images_in(folder / "mask")
            if masks:
                kind = _kind_from_palette(masks[0])
                if kind is not None:
                    return kind
    if list(root.glob("*.csv")):
        return "generic"
    raise WsiprotoError(
        "unknown dataset layout: no training file names with [..] labels, no val/test palette "
        "masks of a known dataset, no CSV", path=root,
        hint="pass kind= (bcss, luad-histoseg, wsss4luad, generic) or csv= with image-level labels")


def open_dataset(root: str | Path, split: str, kind: str = "auto", csv: str | Path | None = None,
                 *, classes: str | ClassTable | Sequence[str] | None = None,
                 masks: str | Path | None = None, check_sizes: bool = True,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 ) -> LabelledPatches | MaskedPatches:
    """Open one split of a dataset folder; the class table is ``dataset.table``.

    ``split`` is ``train`` (a :class:`LabelledPatches`), ``val`` or ``test`` (a
    :class:`MaskedPatches`). ``kind="auto"`` detects the layout (:func:`detect_kind`). For
    ``generic``, ``csv`` is the label file (default: the single ``*.csv`` in the root),
    ``classes`` the class table (default: a registered table whose class names are the CSV's
    columns, else a table made from those columns) and ``masks`` the mask folder (default
    ``root/masks`` or ``root/mask``). ``check_sizes`` compares image and mask sizes from their
    headers at once instead of only when an item is loaded.
    """
    root = Path(root).expanduser()
    if root.is_file():
        raise WsiprotoError("is a file, not a dataset folder", path=root,
                            hint="pass the folder that holds the dataset's splits (e.g. train/, "
                                 "val/, test/), not a file inside it")
    if not root.is_dir():
        raise WsiprotoError("dataset folder not found", path=root, hint="check the path")
    split = _norm_split(split)
    kind = _norm_kind(kind)
    if kind == "auto":
        kind = detect_kind(root, csv)
    if kind == "generic":
        ds = _open_generic(root, split, csv, classes, masks, transform)
    else:
        table = get_class_table(classes if classes is not None else kind)
        ds = (_open_named_train(root, kind, table, transform) if split == "train"
              else _open_named_eval(root, split, kind, table, transform))
    if check_sizes and isinstance(ds, MaskedPatches):
        ds.check_sizes()
    return ds


def _open_named_train(root: Path, kind: str, table: ClassTable, transform) -> LabelledPatches:
    folder = _train_folder(root)
    if folder is None:
        raise WsiprotoError(f"no training folder ({', '.join(SPLIT_DIRS['train'])})", path=root,
                            hint=f"put the {kind} training patches in {root / 'train'}")
    paths = _images_in(folder)
    if not paths:
        raise WsiprotoError("empty split train: no image files", path=folder,
                            hint=f"expected patches named like {LABEL_EXAMPLES[kind]}")
    labels = np.stack([parse_label(p, table.num_classes, kind=kind) for p in paths])
    return LabelledPatches(paths, labels, table, kind=kind, split="train", root=root,
                           transform=transform)


def _open_named_eval(root: Path, split: str, kind: str, table: ClassTable,
                     transform) -> MaskedPatches:
    folder = _split_dir(root, split)
    if folder is None:
        raise WsiprotoError(f"no {split} folder ({', '.join(SPLIT_DIRS[split])})", path=root,
                            hint=f"expected {root / split}/img and {root / split}/mask")
    img_dir, mask_dir = folder / "img", folder / "mask"
    for sub in (img_dir, mask_dir):
        if not sub.is_dir():
            raise WsiprotoError(f"split {split} has no {sub.name}/ folder", path=folder,
                                hint=f"put images in {img_dir} and masks in {mask_dir}")
    images = {p.stem: p for p in _images_in(img_dir)}
    masks_ = {p.stem: p for p in _images_in(mask_dir)}
    missing = sorted(set(images) - set(masks_))
    if missing:
        raise WsiprotoError(f"image has no mask ({len(missing)} such images in split {split})",
                            path=images[missing[0]],
                            hint=f"add {mask_dir / (missing[0] + '.png')} or remove the image")
    orphans = sorted(set(masks_) - set(images))
    if orphans:
        log.warning("%s: %d mask(s) without an image skipped: %s", mask_dir, len(orphans),
                    ", ".join(masks_[s].name for s in orphans))
    stems = sorted(images)
    if not stems:
        raise WsiprotoError(f"empty split {split}: no image files", path=img_dir,
                            hint="check the dataset folder")
    return MaskedPatches([images[s] for s in stems], [masks_[s] for s in stems], table,
                         kind=kind, split=split, root=root, transform=transform)


def _resolve_table(columns: list[str], classes, csv_path: Path) -> ClassTable:
    if classes is not None:
        table = get_class_table(classes)
        lower = {c.lower() for c in columns}
        absent = [n for n in table.names if n.lower() not in lower]
        if absent:
            raise WsiprotoError(f"CSV has no column for class(es) {absent} of table {table.name!r}",
                                path=csv_path, hint=f"add one 0/1 column per class: {table.names}")
        return table
    if not columns:
        raise WsiprotoError("CSV has no class columns besides 'image'", path=csv_path,
                            hint="add one 0/1 column per class name")
    wanted = [c.lower() for c in columns]
    for name in ("bcss", "luad-histoseg", "wsss4luad"):
        table = get_class_table(name)
        if [n.lower() for n in table.names] == wanted:
            return table
    return ClassTable.from_names(columns, name=csv_path.stem)


def _open_generic(root: Path, split: str, csv, classes, masks, transform):
    if csv is None:
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise WsiprotoError(f"generic dataset needs one label CSV, found {len(found)} in the root",
                                path=root, hint="pass csv= (columns image + one 0/1 column per class)")
        csv_path = found[0]
    else:
        csv_path = Path(csv).expanduser()
        if not csv_path.is_absolute() and not csv_path.exists():
            csv_path = root / csv_path
    if not csv_path.is_file():
        raise WsiprotoError("label CSV not found", path=csv_path, hint="check the csv= path")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = _csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "image" not in header:
        raise WsiprotoError("CSV has no 'image' column", path=csv_path,
                            hint="first column 'image' (patch path), then one 0/1 column per class")
    meta = {"image", "split", "mask"}
    table = _resolve_table([h for h in header if h not in meta], classes, csv_path)
    by_lower = {h.lower(): h for h in header}
    columns = [by_lower[n.lower()] for n in table.names]
    if "split" in header:
        rows = [r for r in rows if _SPLIT_ALIASES.get(r["split"].lower(), r["split"].lower()) == split]
    if not rows:
        raise WsiprotoError(f"empty split {split}: no rows" + (" with this split" if "split" in header else ""),
                            path=csv_path, hint="add rows (or a 'split' column with train/val/test)")

    def locate(name: str) -> Path:
        p = Path(name)
        if p.is_absolute():
            return p
        for base in (csv_path.parent, root):
            if (base / p).exists():
                return base / p
        return root / p

    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        if not row["image"]:
            raise WsiprotoError(f"row {line}: empty image path", path=csv_path)
        path = locate(row["image"])
        if not path.is_file():
            raise WsiprotoError(f"row {line}: image {row['image']} not found", path=csv_path,
                                hint=f"image paths are relative to {csv_path.parent}")
        values = []
        for col in columns:
            value = row.get(col, "")
            if value not in ("0", "1", "0.0", "1.0"):
                raise WsiprotoError(f"row {line} ({row['image']}): cannot parse label {col}={value!r}",
                                    path=csv_path, hint="class columns hold 0 or 1")
            values.append(float(value))
        paths.append(path)
        labels.append(values)
    labels_arr = np.array(labels, dtype=np.float32).reshape(len(paths), table.num_classes)
    if split == "train":
        return LabelledPatches(paths, labels_arr, table, kind="generic", split=split, root=root,
                               transform=transform)

    mask_dir = None
    if masks is not None:
        mask_dir = Path(masks).expanduser()
        if not mask_dir.is_absolute() and not mask_dir.exists():
            mask_dir = root / mask_dir
        if not mask_dir.is_dir():
            raise WsiprotoError("mask folder not found", path=mask_dir, hint="check the masks= path")
    else:
        mask_dir = next((root / n for n in ("masks", "mask") if (root / n).is_dir()), None)
    mask_paths = []
    for row, path in zip(rows, paths):
        if row.get("mask"):
            mask = locate(row["mask"])
        elif mask_dir is not None:
            mask = mask_dir / (path.stem + ".png")
        else:
            raise WsiprotoError(f"split {split} needs pixel masks: no 'mask' column and no masks/ folder",
                                path=csv_path, hint="pass masks= (a folder of <image stem>.png masks)")
        if not mask.is_file():
            raise WsiprotoError("mask not found", path=mask,
                                hint=f"add the mask of {path.name} or remove its row from {csv_path.name}")
        mask_paths.append(mask)
    return MaskedPatches(paths, mask_paths, table, kind="generic", split=split, root=root,
                         labels=labels_arr, transform=transform)
