"""Weakly labelled patch sets cut from large images with pixel masks (WSSS4LUAD layout).

:func:`build_mask_crops` cuts every source image (e.g. WSSS4LUAD's validation set,
``val/img/NN.png`` + ``val/mask/NN.png``, palette 0 tumor, 1 stroma, 2 normal, 3 background) into
``size`` x ``size`` crops on a regular grid, labels each crop with the classes covering at least
``min_area`` of it, and splits **by source image** into train, (optional) val and a held-out test.

Choices (ours):

* **Grid**: positions ``0, stride, 2*stride, ...`` (``stride`` default ``size``). ``edge``
  decides the remainder at the right/bottom: ``"shift"`` (default) adds one crop flush with the
  edge, overlapping its neighbour, so every pixel is covered without padding (overlapping test
  pixels are then counted twice by a patch-wise metric); ``"pad"`` adds a crop that runs past the
  edge, padded like small images (disjoint crops, exact once coverage); ``"drop"`` leaves it out.
* **Small images** (a side below ``size``): ``small="pad"`` (default) pads to ``size`` with white
  pixels (``pad_value``) and mask = background, at the bottom/right; ``small="skip"`` leaves the
  image out (listed in the manifest).
* **Labels**: class ``c`` is in a crop's label when it covers at least ``min_area`` (default 1%)
  of the crop's ``size * size`` pixels (padding included in the area). Crops with no labelled
  tissue class are dropped from every split (they carry no weak label, and as evaluation crops
  they hold nothing but background).
* **Split by source image**, from the seed: ``holdout_fraction`` of the images (at least one)
  form the test split; then ``val_fraction`` of all images (at least one when above 0) are taken
  from the remaining ones as the val split (default 0.1, so a training loop can select
  checkpoints without ever seeing test images). Both are stratified by class
  (:func:`_choose_heldout`): a class carried by ``k >= 2`` images gets about the same fraction
  of them held out (at least one), and the training side keeps at least one image of every
  class. An image is in exactly one split.
* **Output** (``open_dataset(out, split, kind="wsss4luad")``)::

      out/train/<src>_<y>_<x>-[1, 0, 0].png        # no masks for train
      out/val/{img,mask}/<src>_<y>_<x>.png          # palette masks, background = num_classes
      out/test/{img,mask}/<src>_<y>_<x>.png
      out/manifest.json

  ``<y>_<x>`` is the crop's top-left corner in the source image. The label spelling follows the
  class table: ``-[1, 0, 0]`` for WSSS4LUAD, ``+0[1101]`` for BCSS, ``-[1 0 0 1]`` for LUAD-HistoSeg.

WSSS4LUAD is for research use only and may not be redistributed: never commit a generated tree.
The tree is written to ``<out>.tmp-XXXX`` and renamed at the end; output bytes are identical for
a given seed and inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from wsiproto.classes import ClassTable, get_class_table
from wsiproto.data.datasets import IMAGE_SUFFIXES, image_size, read_mask, read_rgb
from wsiproto.data.mosaics import (
    check_output_dir,
    label_file_suffix,
    labels_from_mask,
    staged_output,
    table_kind,
    write_manifest,
    write_palette_mask,
    write_rgb_png,
)
from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

EDGES = ("shift", "pad", "drop")
WSSS4LUAD_NOTE = ("WSSS4LUAD (Han et al.) is for research use only and may not be redistributed: "
                  "never commit or publish this generated tree.")


def grid_positions(length: int, size: int, stride: int, edge: str = "shift") -> list[int]:
    """Crop starts along one axis of ``length`` pixels (see the module docstring for ``edge``)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    last_end = starts[-1] + size
    if last_end < length:
        if edge == "shift":
            starts.append(length - size)
        elif edge == "pad":
            starts.append(starts[-1] + stride)
    return starts


def _pairs(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    def listing(folder: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}

    images, masks = listing(images_dir), listing(masks_dir)
    pairs = [(stem, images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    no_image = sorted(set(masks) - set(images))
    no_mask = sorted(set(images) - set(masks))
    return pairs, no_image, no_mask


def _choose_heldout(rng: np.random.Generator, candidates: list[str], classes: dict[str, set[int]],
                    n: int, num_classes: int) -> list[str]:
    """``n`` of ``candidates`` for a held-out side, stratified by class.

    A class carried by ``k >= 2`` candidates gets ``max(1, round(f * k))`` of them held out
    (``f = n / len(candidates)``), rarest class first; each pick (and each remaining place) goes
    to the image whose classes would have the smallest held-out share (ties: random order from
    the seed).
    The training side keeps at least one image of every class it has, where ``n`` allows.
    """
    n = min(n, len(candidates))
    frac = n / max(1, len(candidates))
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    have = {c: sum(c in classes[s] for s in candidates) for c in range(num_classes)}
    chosen: list[str] = []

    def held(c: int) -> int:
        return sum(c in classes[s] for s in chosen)

    def spare(s: str) -> bool:  # would the training side still have all its classes without s?
        return all(held(c) + 1 < have[c] for c in classes[s])

    def share(s: str) -> float:  # the largest held-out share among s's classes, were s held out
        return max((held(c) + 1) / have[c] for c in classes[s])

    for c in sorted(range(num_classes), key=lambda c: (have[c], c)):
        target = max(1, round(frac * have[c])) if have[c] >= 2 else 0
        while len(chosen) < n and held(c) < target:
            pool = [s for s in order if s not in chosen and c in classes[s] and spare(s)]
            if not pool:
                break
            chosen.append(min(pool, key=share))
    while len(chosen) < n:
        free = [s for s in order if s not in chosen]
        chosen.append(min([s for s in free if spare(s)] or free, key=share))
    return sorted(chosen)


def build_mask_crops(source: str | Path, out_dir: str | Path, *,
                     table: str | ClassTable = "wsss4luad",
                     images: str = "img", masks: str = "mask",
                     size: int = 224, stride: int | None = None, edge: str = "shift",
                     small: str = "pad", pad_value: int = 255, min_area: float = 0.01,
                     holdout_fraction: float = 0.3, val_fraction: float = 0.1, seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Cut ``source/<images>/*`` with their masks ``source/<masks>/<stem>.png`` into a weakly
    labelled WSSS4LUAD-style tree at ``out_dir``, split by source image. Returns ``out_dir``.

    Masks without an image are skipped (listed in the manifest); an image without a mask, or of
    another size than its mask, is an error. See the module docstring for the grid, padding,
    labels and split rules.
    """
    table = get_class_table(table)
    kind = table_kind(table)
    stride = size if stride is None else int(stride)
    if size < 8 or stride < 1:
        raise WsiprotoError(f"need size >= 8 and stride >= 1, got size={size}, stride={stride}")
    if edge not in EDGES:
        raise WsiprotoError(f"unknown edge rule {edge!r}", hint=f"choose {', '.join(EDGES)}")
    if small not in ("pad", "skip"):
        raise WsiprotoError(f"unknown small-image rule {small!r}", hint="choose pad or skip")
    if not (0.0 < holdout_fraction < 1.0) or not (0.0 <= val_fraction < 1.0) \
            or holdout_fraction + val_fraction >= 1.0:
        raise WsiprotoError(f"holdout_fraction {holdout_fraction} and val_fraction {val_fraction} "
                            "must lie in (0, 1) and [0, 1) and leave images for training")
    out = check_output_dir(out_dir, overwrite)
    root = Path(source).expanduser()
    images_dir, masks_dir = root / images, root / masks
    for folder in (root, images_dir, masks_dir):
        if not folder.is_dir():
            raise WsiprotoError("folder not found", path=folder,
                                hint=f"expected {root}/{images}/<name>.png and {root}/{masks}/<name>.png")
    pairs, no_image, no_mask = _pairs(images_dir, masks_dir)
    if no_mask:
        raise WsiprotoError(f"image has no mask ({len(no_mask)} such images)",
                            path=images_dir / no_mask[0],
                            hint=f"add {masks_dir / (no_mask[0] + '.png')} or remove the image")
    if no_image:
        log.warning("%s: %d mask(s) without an image skipped: %s", masks_dir, len(no_image),
                    ", ".join(no_image))
    if len(pairs) < 2:
        raise WsiprotoError(f"{len(pairs)} image/mask pair(s): a split by source image needs at least 2",
                            path=root)

    # Cut every image once (crops kept in memory only as their positions and labels).
    bg = table.background_index
    crops: dict[str, list[tuple[int, int, np.ndarray]]] = {}
    info: dict[str, dict] = {}
    skipped_small: list[str] = []
    for stem, img_path, mask_path in pairs:
        mask = read_mask(mask_path, table)
        _check_size(mask, image_size(img_path), mask_path)
        h, w = mask.shape
        info[stem] = {"size": [w, h]}
        if (h < size or w < size) and small == "skip":
            skipped_small.append(stem)
            continue
        kept = []
        for y in grid_positions(h, size, stride, edge):
            for x in grid_positions(w, size, stride, edge):
                sub = _crop(mask, y, x, size, bg)
                labels = labels_from_mask(sub, table.num_classes, min_area)
                if labels.any():
                    kept.append((y, x, labels))
        crops[stem] = kept
    usable = [s for s in sorted(crops) if crops[s]]
    dropped_empty = [s for s in sorted(crops) if not crops[s]]
    if len(usable) < 2:
        raise WsiprotoError(f"{len(usable)} source image(s) give labelled crops; need at least 2",
                            path=root, hint="lower min_area or size")
    classes = {s: set(np.flatnonzero(np.any([lab for _, _, lab in crops[s]], axis=0)).tolist())
               for s in usable}

    rng = np.random.default_rng([seed, 11])
    n_test = max(1, round(holdout_fraction * len(usable)))
    test = _choose_heldout(rng, usable, classes, n_test, table.num_classes)
    rest = [s for s in usable if s not in test]
    n_val = 0 if val_fraction <= 0 else max(1, round(val_fraction * len(usable)))
    n_val = min(n_val, len(rest) - 1)
    val = _choose_heldout(rng, rest, classes, n_val, table.num_classes) if n_val > 0 else []
    train = [s for s in rest if s not in val]
    split_of = {**{s: "train" for s in train}, **{s: "val" for s in val}, **{s: "test" for s in test}}

    counts = {split: {"sources": 0, "crops": 0, "crops_per_class": dict.fromkeys(table.names, 0)}
              for split in ("train", "val", "test")}
    with staged_output(out, overwrite) as tmp:
        (tmp / "train").mkdir()
        for split in ("val", "test"):
            if any(v == split for v in split_of.values()):
                (tmp / split / "img").mkdir(parents=True)
                (tmp / split / "mask").mkdir()
        for stem, img_path, mask_path in pairs:
            if stem not in split_of:
                continue
            split = split_of[stem]
            rgb, mask = _read_pair(img_path, mask_path, table)
            counts[split]["sources"] += 1
            for y, x, labels in crops[stem]:
                name = f"{stem}_{y}_{x}"
                sub_rgb = _crop(rgb, y, x, size, pad_value)
                counts[split]["crops"] += 1
                for c in np.flatnonzero(labels):
                    counts[split]["crops_per_class"][table.names[c]] += 1
                if split == "train":
                    write_rgb_png(tmp / "train" / f"{name}{label_file_suffix(labels, kind)}.png", sub_rgb)
                else:
                    write_rgb_png(tmp / split / "img" / f"{name}.png", sub_rgb)
                    write_palette_mask(tmp / split / "mask" / f"{name}.png",
                                       _crop(mask, y, x, size, bg), table)
            info[stem].update(split=split, crops=len(crops[stem]),
                              classes=[table.names[c] for c in sorted(classes[stem])])
        for stem in skipped_small:
            info[stem].update(split=None, reason=f"smaller than {size} px (small='skip')")
        for stem in dropped_empty:
            info[stem].update(split=None, reason="no crop with a labelled tissue class")
        write_manifest(tmp, {
            "wsiproto": "mask-crops",
            "version": 1,
            "kind": kind,
            "layout": "train/<src>_<y>_<x>" + label_file_suffix([1] * table.num_classes, kind)
                      .replace("1", "x") + ".png; val|test/{img,mask}/<src>_<y>_<x>.png",
            "class_table": {"name": table.name, "classes": table.names,
                            "background": table.background_name, "background_index": bg},
            "source": str(root),
            "seed": seed,
            "params": {"size": size, "stride": stride, "edge": edge, "small": small,
                       "pad_value": pad_value, "min_area": min_area,
                       "holdout_fraction": holdout_fraction, "val_fraction": val_fraction},
            "splits": {split: sorted(s for s, v in split_of.items() if v == split)
                       for split in ("train", "val", "test")},
            "counts": counts,
            "sources": info,
            "masks_without_image": no_image,
            "note": WSSS4LUAD_NOTE if table.name == "wsss4luad" else
                    "check the source data's licence before sharing this tree",
        })
    log.info("wrote %s: %s", out, {k: (v["sources"], v["crops"]) for k, v in counts.items()})
    return out


def _check_size(mask: np.ndarray, image_wh: tuple[int, int], mask_path: Path) -> None:
    if (mask.shape[1], mask.shape[0]) != tuple(image_wh):
        raise WsiprotoError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image_wh[0]}x{image_wh[1]}", path=mask_path,
                            hint="masks must have their image's pixel size")


def _read_pair(img_path: Path, mask_path: Path, table: ClassTable) -> tuple[np.ndarray, np.ndarray]:
    rgb = read_rgb(img_path)
    mask = read_mask(mask_path, table)
    _check_size(mask, (rgb.shape[1], rgb.shape[0]), mask_path)
    return rgb, mask


def _crop(arr: np.ndarray, y: int, x: int, size: int, fill: int) -> np.ndarray:
    """``arr[y:y+size, x:x+size]``, padded with ``fill`` at the bottom/right where it runs out."""
    part = arr[y:y + size, x:x + size]
    if part.shape[0] == size and part.shape[1] == size:
        return part
    out = np.full((size, size, *arr.shape[2:]), fill, dtype=arr.dtype)
    out[:part.shape[0], :part.shape[1]] = part
    return out


__all__ = ["EDGES", "WSSS4LUAD_NOTE", "build_mask_crops", "grid_positions"]
