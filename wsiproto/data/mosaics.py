"""Weakly labelled training mosaics built from class-labelled tissue tiles (BCSS-WSSS layout).

Tile-classification datasets such as Kather et al. 2016 (``kather2016/NN_CLASS/*.tif``, 150 px at
0.495 um/px) and CRC-VAL-HE-7K (``crc-val-he-7k/CLASS-*.png`` or ``CLASS/*.png``, 224 px at
0.5 um/px) show one tissue type per tile. :func:`build_tile_mosaics` turns them into a
segmentation-shaped dataset: each output image is a ``size`` x ``size`` mosaic of a few regions,
each region filled with crops of tiles of one class, and its image-level label is the set of
tissue classes covering at least ``min_area`` of the pixels. Evaluation mosaics get exact palette
masks, since the layout is known.

Choices (ours; the data sets say nothing about mosaics):

* **Layouts**: one region (single-class images, ``p_single``) or 2..``max_regions`` regions from
  one of three generators, drawn uniformly: guillotine rectangles (random axis-aligned splits),
  a power-Voronoi partition (straight boundaries at any angle) and curved blobs (star-shaped
  ellipses with a few Fourier harmonics on their radius) over a base region. Every region covers at
  least ``min_region`` of the image (layouts are redrawn otherwise), so a region's class is
  labelled unless ``min_area`` is set above ``min_region``. Regions mostly get distinct classes
  (drawn with ``class_weights``); with probability ``p_repeat`` a region repeats a class already
  in the image. An image always has at least one labelled tissue class.
* **No rescaling**: both sources are about 0.5 um/px, so crops are copied at native resolution and
  the mosaics are at about 0.5 um/px (BCSS-WSSS itself is 0.25 um/px). A crop is never larger
  than its tile: a region whose bounding box exceeds the class's smallest tile is filled with a
  grid of crops (from random tiles of that class, each crop with a random flip and 90-degree
  rotation), so seams also occur inside a class region and are no cue for class boundaries.
* **One source per image** (``mix_sources=False``): stains differ between the two sources, and
  a mosaic mixing them would let a model find region boundaries by stain instead of tissue.
* **Mapping** (:data:`TILE_TO_BCSS`): TUMOR/TUM -> TUM, STROMA/STR -> STR, LYMPHO/LYM -> LYM,
  DEBRIS/DEB -> NEC, EMPTY/ADIPOSE/ADI -> background. COMPLEX, MUCOSA, MUC, MUS and NORM are left
  out by default: they are tissue that is none of the four classes, and teaching the model to
  call muscle or normal mucosa "background" is a choice the user should make explicitly
  (``negatives=True`` maps them to background, as BCSS's background/exclude class does).
* **Held-out tiles**: per source and source class, ``holdout_per_class`` tiles (chosen from the
  seed) never enter a training mosaic; the **test** mosaics are made from them only. The **val**
  mosaics are made from *training* tiles by default (``val_from="train"``): with three tiles per
  class there are not enough to hold out two, and selecting checkpoints on the test tiles would
  leak them. Val thus measures localisation on new layouts of seen tissue, test on unseen tiles.
  ``val_from="holdout"`` makes val from the held-out tiles instead.

Layout written (readable by ``open_dataset(out, split, kind="bcss")``)::

    out/train/mosaic_000000+0[1101].png     # labels [TUM, STR, LYM, NEC]
    out/val/{img,mask}/mosaic_val_0000.png  # palette masks, background = num_classes
    out/test/{img,mask}/mosaic_test_0000.png
    out/train-masks/mosaic_000000.png       # only with train_masks=True (diagnostics)
    out/manifest.json

Output is byte-identical for a given seed and inputs (each image has its own random stream
``(seed, split, index)``, so the first ``n`` images do not depend on ``n_train``). The tree is
written to ``<out>.tmp-XXXX`` beside ``out`` and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from wsiproto.classes import ClassTable, get_class_table
from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

TILE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
BACKGROUND = "background"

#: Source class (upper case, ``NN_`` prefix stripped) -> BCSS class, ``background`` or None (left out).
TILE_TO_BCSS: dict[str, str | None] = {
    "TUMOR": "TUM", "TUM": "TUM",
    "STROMA": "STR", "STR": "STR",
    "LYMPHO": "LYM", "LYM": "LYM",
    "DEBRIS": "NEC", "DEB": "NEC",
    "EMPTY": BACKGROUND, "ADIPOSE": BACKGROUND, "ADI": BACKGROUND,
    "COMPLEX": None, "MUCOSA": None, "MUC": None, "MUS": None, "NORM": None, "BACK": None,
}

#: What we know about the public tile sets (matched on the source folder's name).
KNOWN_SOURCES: dict[str, dict] = {
    "kather2016": {
        "mpp": 0.495,
        "citation": "Kather JN, Weis CA, Bianconi F, et al. Multi-class texture analysis in "
                    "colorectal cancer histology. Sci Rep 6, 27988 (2016). "
                    "doi:10.1038/srep27988; data: doi:10.5281/zenodo.53169",
        "licence": "CC BY 4.0",
    },
    "crc-val-he-7k": {
        "mpp": 0.5,
        "citation": "Kather JN, Halama N, Marx A. 100,000 histological images of human colorectal "
                    "cancer and healthy tissue (CRC-VAL-HE-7K). Zenodo (2018), "
                    "doi:10.5281/zenodo.1214456; Kather JN et al., PLoS Med 16(1): e1002730 (2019)",
        "licence": "CC BY 4.0",
    },
}

LAYOUTS = ("rect", "voronoi", "blobs")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


# --- helpers shared with wsiproto.data.crops ---------------------------------------------------

def label_file_suffix(labels: Sequence[float] | np.ndarray, kind: str) -> str:
    """The label part of a training file name: ``+0[1101]`` (bcss), ``-[1 0 0 1]``
    (luad-histoseg) or ``-[1, 0, 0]`` (wsss4luad and any other table)."""
    bits = [str(round(float(v))) for v in labels]
    if kind == "bcss":
        return "+0[" + "".join(bits) + "]"
    if kind == "luad-histoseg":
        return "-[" + " ".join(bits) + "]"
    return "-[" + ", ".join(bits) + "]"


def table_kind(table: ClassTable) -> str:
    """The dataset layout whose label spelling goes with a class table."""
    return table.name if table.name in ("bcss", "luad-histoseg", "wsss4luad") else "generic"


def write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path, format="PNG")


def write_palette_mask(path: Path, mask: np.ndarray, table: ClassTable) -> None:
    """A palette PNG of class indices (background = ``table.background_index``) in the table's colours."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode L
    flat = [v for rgb in table.palette() for v in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))  # L -> P
    im.save(path, format="PNG")


def labels_from_mask(mask: np.ndarray, num_classes: int, min_area: float) -> np.ndarray:
    """Image-level labels: classes covering at least ``min_area`` of the mask's pixels (float32 [C])."""
    counts = np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes]
    return (counts >= min_area * mask.size).astype(np.float32) * (counts > 0)


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty existing output folder unless ``overwrite``; returns the path."""
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise WsiprotoError("output path exists and is not a folder", path=out,
                                hint="choose another output folder")
        if any(out.iterdir()) and not overwrite:
            raise WsiprotoError("output folder exists and is not empty", path=out,
                                hint="pass overwrite=True (or choose another folder)")
    return out


@contextmanager
def staged_output(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh ``<out>.tmp-XXXX`` folder beside ``out``; on success it replaces ``out``
    (an existing one only with ``overwrite``), on error it is removed."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        check_output_dir(out, overwrite)  # it may have appeared meanwhile
        if out.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: Mapping) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=False, ensure_ascii=False)
    (folder / "manifest.json").write_text(text + "\n", encoding="utf-8")


# --- tile discovery ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """One labelled tile: its source (folder), source class and path relative to the tiles root."""

    source: str
    cls: str
    rel: str


def _class_key(name: str) -> str:
    return re.sub(r"^\d+[_-]", "", name).strip().upper()


def discover_tiles(tiles_root: str | Path, mapping: Mapping[str, str | None] | None = None,
                   sources: Sequence[str] | None = None) -> list[Tile]:
    """Every tile under ``tiles_root`` whose class the mapping knows, sorted by path.

    A tile's class is its folder's name (``01_TUMOR`` -> ``TUMOR``) when the mapping knows it,
    else its file name's prefix before the first ``-`` or ``_`` (``TUM-TCGA-X.png`` -> ``TUM``).
    Its source is the first folder below ``tiles_root`` (``kather2016``), or the root's own
    name when the class folders lie directly in it. ``sources`` keeps only those sources.
    """
    root = Path(tiles_root).expanduser()
    if not root.is_dir():
        raise WsiprotoError("tiles folder not found", path=root,
                            hint="point to a folder of class-labelled tiles, e.g. "
                                 "tiles/kather2016/NN_CLASS/*.tif or tiles/crc-val-he-7k/CLASS-*.png")
    known = {k.upper() for k in (mapping if mapping is not None else TILE_TO_BCSS)}
    tiles = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in TILE_SUFFIXES or path.name.startswith("."):
            continue
        rel = path.relative_to(root)
        parent_key = _class_key(path.parent.name) if len(rel.parts) >= 2 else None
        if parent_key in known:
            cls = parent_key
            source = rel.parts[0] if len(rel.parts) >= 3 else root.name
        else:
            cls = _class_key(re.split(r"[-_]", path.stem, maxsplit=1)[0])
            if cls not in known:
                continue
            source = rel.parts[0] if len(rel.parts) >= 2 else root.name
        if sources is not None and source not in sources:
            continue
        tiles.append(Tile(source, cls, rel.as_posix()))
    return tiles


def _resolve_mapping(mapping: Mapping[str, str | None], table: ClassTable,
                     negatives: bool) -> dict[str, int | None]:
    """Source class -> class index (background = ``table.background_index``) or None."""
    out: dict[str, int | None] = {}
    for key, target in mapping.items():
        if target is None:
            out[key.upper()] = table.background_index if negatives else None
            continue
        name = str(target).strip()
        if name.lower() in (BACKGROUND, table.background_name.lower()):
            out[key.upper()] = table.background_index
            continue
        try:
            out[key.upper()] = table.index(name)
        except WsiprotoError:
            raise WsiprotoError(f"mapping sends {key} to {target!r}, which is not a class of table "
                                f"{table.name!r} ({', '.join(table.names)}) nor background",
                                hint="map source classes to table classes, 'background' or None") from None
    return out


# --- layouts -----------------------------------------------------------------------------------

def _rect_layout(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    rects = [(0, 0, size, size)]
    while len(rects) < k:
        areas = np.array([h * w for _, _, h, w in rects], dtype=np.float64)
        y, x, h, w = rects.pop(int(rng.choice(len(rects), p=areas / areas.sum())))
        axis = 0 if h > 1.3 * w else 1 if w > 1.3 * h else int(rng.integers(2))
        length = h if axis == 0 else w
        cut = round(length * float(rng.uniform(0.3, 0.7)))
        if axis == 0:
            rects += [(y, x, cut, w), (y + cut, x, h - cut, w)]
        else:
            rects += [(y, x, h, cut), (y, x + cut, h, w - cut)]
    regions = np.zeros((size, size), dtype=np.int32)
    for i, (y, x, h, w) in enumerate(rects):
        regions[y:y + h, x:x + w] = i
    return regions


def _voronoi_layout(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    pts = rng.uniform(0, size, (k, 2)).astype(np.float32)
    weights = rng.uniform(0, (0.25 * size) ** 2, k).astype(np.float32)
    dist = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    return np.argmin(dist - weights[:, None, None], axis=0).astype(np.int32)


def _blob_layout(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    regions = np.zeros((size, size), dtype=np.int32)
    for i in range(1, k):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        ay, ax = rng.uniform(0.15, 0.45, 2)
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        u = ((yy - cy) * c + (xx - cx) * s) / ay
        v = (-(yy - cy) * s + (xx - cx) * c) / ax
        theta = np.arctan2(v, u)
        radius = np.ones_like(theta)
        for m in range(2, 6):
            radius += rng.uniform(0, 0.12) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
        regions[u * u + v * v < radius * radius] = i
    return regions


_LAYOUT_FUNCS = {"rect": _rect_layout, "voronoi": _voronoi_layout, "blobs": _blob_layout}


def random_layout(rng: np.random.Generator, size: int, k: int, *, layouts: Sequence[str] = LAYOUTS,
                  min_region: float = 0.05, tries: int = 50) -> np.ndarray:
    """A ``[size, size]`` int32 map of ``k`` regions (0..k-1), each covering >= ``min_region``."""
    if k <= 1:
        return np.zeros((size, size), dtype=np.int32)
    for _ in range(tries):
        name = layouts[int(rng.integers(len(layouts)))]
        regions = _LAYOUT_FUNCS[name](rng, size, k)
        counts = np.bincount(regions.ravel(), minlength=k)
        if counts.min() >= min_region * size * size:
            return regions
    return _rect_layout(rng, size, k)  # splits of 0.3..0.7 keep every region >= 2.7% at k <= 4


def _cuts(rng: np.random.Generator, length: int, limit: int) -> list[tuple[int, int]]:
    """Split ``length`` into consecutive pieces of at most ``limit`` with jittered boundaries."""
    n = -(-length // limit)
    if n <= 1:
        return [(0, length)]
    step = length / n
    jitter = max(0.0, (limit - step) / 2 - 0.5)
    bounds = [0] + [round(i * step + float(rng.uniform(-jitter, jitter))) for i in range(1, n)] + [length]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


# --- the builder -------------------------------------------------------------------------------

def build_tile_mosaics(tiles_root: str | Path, out_dir: str | Path, *,
                       mapping: Mapping[str, str | None] | None = None,
                       table: str | ClassTable = "bcss",
                       n_train: int = 2000, n_eval: int = 200, n_val: int | None = None,
                       size: int = 224, seed: int = 0, holdout_per_class: int = 1,
                       min_area: float = 0.02, min_region: float = 0.05,
                       max_regions: int = 4, p_single: float = 0.2, p_repeat: float = 0.2,
                       layouts: Sequence[str] = LAYOUTS,
                       class_weights: Mapping[str, float] | None = None,
                       negatives: bool = False, mix_sources: bool = False,
                       val_from: str = "train", sources: Sequence[str] | None = None,
                       train_masks: bool = False, overwrite: bool = False) -> Path:
    """Build a BCSS-WSSS-style tree of weakly labelled mosaics from class-labelled tiles.

    ``tiles_root`` holds one folder per source (``kather2016/NN_CLASS/*.tif``,
    ``crc-val-he-7k/CLASS-*.png``) or is one source itself. ``mapping`` sends source classes to
    ``table`` classes, ``"background"`` or None (left out; background with ``negatives=True``);
    default :data:`TILE_TO_BCSS` for the bcss table. ``n_train`` training mosaics (labels in the
    names), ``n_eval`` test mosaics from held-out tiles and ``n_val`` (default ``n_eval``) val
    mosaics (from training tiles unless ``val_from="holdout"``), both with palette masks.
    ``class_weights`` (class name or ``background`` -> weight, default 1 each) sets how often a
    region draws each class. See the module docstring for the layout and the choices.
    Returns the output folder.
    """
    table = get_class_table(table)
    kind = table_kind(table)
    if mapping is None:
        if table.name != "bcss":
            raise WsiprotoError(f"no default tile mapping for table {table.name!r}",
                                hint="pass mapping={source class: table class | 'background' | None}")
        mapping = TILE_TO_BCSS
    if size < 8:
        raise WsiprotoError(f"mosaic size must be >= 8 px, got {size}")
    if holdout_per_class < 1:
        raise WsiprotoError(f"holdout_per_class must be >= 1, got {holdout_per_class}",
                            hint="test mosaics are made from held-out tiles only")
    if val_from not in ("train", "holdout"):
        raise WsiprotoError(f"val_from must be 'train' or 'holdout', got {val_from!r}")
    bad = [name for name in layouts if name not in LAYOUTS]
    if bad or not layouts:
        raise WsiprotoError(f"unknown layout(s) {bad}", hint=f"choose from {', '.join(LAYOUTS)}")
    if not (1 <= max_regions <= 16) or not (0.0 <= p_single <= 1.0) or not (0.0 <= p_repeat <= 1.0):
        raise WsiprotoError("max_regions must be 1..16, p_single and p_repeat 0..1")
    if max_regions * min_region > 0.9:
        raise WsiprotoError(f"min_region {min_region} is too large for {max_regions} regions")
    n_val = n_eval if n_val is None else n_val
    if min(n_train, n_eval, n_val) < 0:
        raise WsiprotoError("image counts must be >= 0")
    out = check_output_dir(out_dir, overwrite)  # refuse early, before any work
    tiles_root = Path(tiles_root).expanduser()

    targets = _resolve_mapping(mapping, table, negatives)
    tiles = discover_tiles(tiles_root, targets, sources)
    used_tiles = [t for t in tiles if targets[t.cls] is not None]
    if not used_tiles:
        raise WsiprotoError("no tiles of a mapped class found", path=tiles_root,
                            hint=f"expected class folders or name prefixes among "
                                 f"{', '.join(sorted(k for k, v in targets.items() if v is not None))}")

    # Hold out tiles per (source, source class), from the seed.
    groups: dict[tuple[str, str], list[Tile]] = {}
    for t in used_tiles:
        groups.setdefault((t.source, t.cls), []).append(t)
    hold_rng = np.random.default_rng([seed, 0])
    train_tiles: dict[tuple[str, str], list[Tile]] = {}
    hold_tiles: dict[tuple[str, str], list[Tile]] = {}
    for key in sorted(groups):
        members = groups[key]
        if len(members) <= holdout_per_class:
            src_dir = tiles_root / key[0] if (tiles_root / key[0]).is_dir() else tiles_root
            raise WsiprotoError(
                f"class {key[1]} of source {key[0]} has {len(members)} tile(s); holding out "
                f"{holdout_per_class} per class needs at least {holdout_per_class + 1}",
                path=src_dir, hint=f"add tiles, lower holdout_per_class or map {key[1]} to None")
        order = hold_rng.permutation(len(members))
        hold_tiles[key] = [members[i] for i in sorted(order[:holdout_per_class])]
        train_tiles[key] = [members[i] for i in sorted(order[holdout_per_class:])]

    weights = np.ones(table.num_classes + 1)
    for name, w in (class_weights or {}).items():
        idx = (table.background_index if name.lower() in (BACKGROUND, table.background_name.lower())
               else table.index(name))
        weights[idx] = float(w)
    missing = [n for i, n in enumerate(table.names)
               if weights[i] > 0 and not any(targets[c] == i for (_, c) in groups)]
    if missing:
        log.warning("%s: no tiles for class(es) %s; the mosaics will never show them",
                    tiles_root, ", ".join(missing))

    load = lru_cache(maxsize=4096)(lambda rel: _read_tile(tiles_root / rel))
    params = {"size": size, "min_area": min_area, "min_region": min_region,
              "max_regions": max_regions, "p_single": p_single, "p_repeat": p_repeat,
              "layouts": list(layouts), "weights": weights, "mix": mix_sources}
    plan = [("train", n_train, train_tiles),
            ("val", n_val, train_tiles if val_from == "train" else hold_tiles),
            ("test", n_eval, hold_tiles)]
    counts: dict[str, dict] = {}
    used: dict[str, set[str]] = {}
    with staged_output(out, overwrite) as tmp:
        for split, n, pool in plan:
            if split == "train":
                (tmp / "train").mkdir()
                if train_masks:
                    (tmp / "train-masks").mkdir()
            else:
                (tmp / split / "img").mkdir(parents=True)
                (tmp / split / "mask").mkdir()
            pools = _Pools(tiles_root, pool, targets, table)
            class_images = np.zeros(table.num_classes, dtype=np.int64)
            pixels = np.zeros(table.num_classes + 1, dtype=np.int64)
            single = 0
            used[split] = set()
            for i in range(n):
                rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
                rgb, mask, labels, rels = _make_mosaic(rng, pools, load, **params)
                used[split].update(rels)
                class_images += labels.astype(np.int64)
                pixels += np.bincount(mask.ravel(), minlength=table.num_classes + 1)
                single += int(labels.sum() == 1)
                if split == "train":
                    stem = f"mosaic_{i:06d}"
                    write_rgb_png(tmp / "train" / f"{stem}{label_file_suffix(labels, kind)}.png", rgb)
                    if train_masks:
                        write_palette_mask(tmp / "train-masks" / f"{stem}.png", mask, table)
                else:
                    stem = f"mosaic_{split}_{i:05d}"
                    write_rgb_png(tmp / split / "img" / f"{stem}.png", rgb)
                    write_palette_mask(tmp / split / "mask" / f"{stem}.png", mask, table)
            total = max(1, int(pixels.sum()))
            counts[split] = {
                "images": n,
                "single_class_images": single,
                "images_per_class": dict(zip(table.names, class_images.tolist())),
                "pixel_fraction": {name: round(int(p) / total, 4) for name, p in
                                   zip([*table.names, table.background_name], pixels.tolist())},
            }
        write_manifest(tmp, _mosaic_manifest(
            tiles_root, tiles, targets, table, kind, seed, size, holdout_per_class, train_tiles,
            hold_tiles, used, counts, {
                "min_area": min_area, "min_region": min_region, "max_regions": max_regions,
                "p_single": p_single, "p_repeat": p_repeat, "layouts": list(layouts),
                "negatives": negatives, "mix_sources": mix_sources, "val_from": val_from,
                "class_weights": dict(zip([*table.names, table.background_name], weights.tolist()))},
            mapping))
    log.info("wrote %d train, %d val, %d test mosaics to %s", n_train, n_val, n_eval, out)
    return out


def _read_tile(path: Path) -> np.ndarray:
    from wsiproto.data.datasets import read_rgb

    rgb = read_rgb(path)
    rgb.setflags(write=False)
    return rgb


class _Pools:
    """The tiles one split may use, indexed by source, then target class, then source class."""

    def __init__(self, root: Path, pool: Mapping[tuple[str, str], list[Tile]],
                 targets: Mapping[str, int | None], table: ClassTable):
        from wsiproto.data.datasets import image_size

        self.table = table
        self.by_source: dict[str, dict[int, dict[str, list[Tile]]]] = {}
        self.limit: dict[str, int] = {}  # smallest tile side, per tile (crops never exceed it)
        for (source, cls), members in sorted(pool.items()):
            target = targets[cls]
            self.by_source.setdefault(source, {}).setdefault(target, {})[cls] = list(members)
            for t in members:
                if t.rel not in self.limit:
                    self.limit[t.rel] = min(image_size(root / t.rel))
        self.sources = sorted(s for s, by_t in self.by_source.items()
                              if any(t < table.num_classes for t in by_t))
        if not self.sources:
            raise WsiprotoError("no tiles of a tissue class to build mosaics from",
                                hint="map at least one source class to a table class")
        merged: dict[int, dict[str, list[Tile]]] = {}
        for source in self.sources:
            for target, by_cls in self.by_source[source].items():
                for cls, members in by_cls.items():
                    merged.setdefault(target, {}).setdefault(f"{source}/{cls}", []).extend(members)
        self.merged = merged

    def for_image(self, rng: np.random.Generator, mix: bool) -> dict[int, dict[str, list[Tile]]]:
        if mix:
            return self.merged
        return self.by_source[self.sources[int(rng.integers(len(self.sources)))]]


def _make_mosaic(rng: np.random.Generator, pools: _Pools, load, *, size: int, min_area: float,
                 min_region: float, max_regions: int, p_single: float, p_repeat: float,
                 layouts: Sequence[str], weights: np.ndarray, mix: bool):
    table = pools.table
    bg = table.background_index
    avail = pools.for_image(rng, mix)
    choices = sorted(t for t in avail if weights[t] > 0)
    tissue = [t for t in choices if t != bg]
    if not tissue:
        raise WsiprotoError("all tissue classes have weight 0", hint="check class_weights")
    for _ in range(100):
        k = 1 if (max_regions == 1 or rng.random() < p_single) else int(rng.integers(2, max_regions + 1))
        regions = random_layout(rng, size, k, layouts=layouts, min_region=min_region)
        pick_from = tissue if k == 1 else choices
        region_class: list[int] = []
        for _ in range(k):  # mostly distinct classes; a repeat now and then (seams inside a class)
            fresh = [c for c in pick_from if c not in region_class]
            pool = region_class if (region_class and (not fresh or rng.random() < p_repeat)) else fresh
            pw = weights[pool] / weights[pool].sum()
            region_class.append(pool[int(rng.choice(len(pool), p=pw))])
        mask = np.asarray(region_class, dtype=np.int64)[regions]
        labels = labels_from_mask(mask, table.num_classes, min_area)
        if labels.any():
            break
    else:
        raise WsiprotoError("could not draw a mosaic with a labelled tissue class",
                            hint="lower min_area or min_region")
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    rels: set[str] = set()
    for r, target in enumerate(region_class):
        where = regions == r
        rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        by_cls = avail[target]
        names = sorted(by_cls)
        members = by_cls[names[int(rng.integers(len(names)))]]
        patch = _fill(rng, y1 - y0, x1 - x0, members, pools.limit, load, rels)
        box = rgb[y0:y1, x0:x1]
        box[where[y0:y1, x0:x1]] = patch[where[y0:y1, x0:x1]]
    return rgb, mask, labels, rels


def _fill(rng: np.random.Generator, h: int, w: int, members: Sequence[Tile],
          limits: Mapping[str, int], load, rels: set[str]) -> np.ndarray:
    """An ``h`` x ``w`` patch of crops of ``members`` (no crop larger than its tile)."""
    limit = min(limits[t.rel] for t in members)
    patch = np.empty((h, w, 3), dtype=np.uint8)
    for y, ch in _cuts(rng, h, limit):
        for x, cw in _cuts(rng, w, limit):
            tile = members[int(rng.integers(len(members)))]
            rels.add(tile.rel)
            img = np.rot90(load(tile.rel), int(rng.integers(4)))
            if rng.random() < 0.5:
                img = img[:, ::-1]
            oy = int(rng.integers(img.shape[0] - ch + 1))
            ox = int(rng.integers(img.shape[1] - cw + 1))
            patch[y:y + ch, x:x + cw] = img[oy:oy + ch, ox:ox + cw]
    return patch


def _mosaic_manifest(tiles_root, tiles, targets, table, kind, seed, size, holdout, train_tiles,
                     hold_tiles, used, counts, params, mapping) -> dict:
    sources = {}
    for t in tiles:
        info = sources.setdefault(t.source, {"tiles": 0, "classes": {}})
        info["tiles"] += 1
        info["classes"][t.cls] = info["classes"].get(t.cls, 0) + 1
    for name, info in sources.items():
        known = KNOWN_SOURCES.get(name.lower(), {})
        info.update({"mpp": known.get("mpp"), "citation": known.get("citation"),
                     "licence": known.get("licence")})
    cls_names = [*table.names, table.background_name]
    held = sorted(t.rel for ts in hold_tiles.values() for t in ts)
    return {
        "wsiproto": "tile-mosaics",
        "version": 1,
        "kind": kind,
        "layout": "train/<name>" + label_file_suffix([1] * table.num_classes, kind).replace("1", "x")
                  + ".png; val|test/{img,mask}/<name>.png (palette masks)",
        "class_table": {"name": table.name, "classes": table.names,
                        "background": table.background_name,
                        "background_index": table.background_index},
        "seed": seed,
        "size": size,
        "mpp": "about 0.5 (tiles copied at native resolution, no rescaling)",
        "tiles_root": str(tiles_root),
        "mapping": {k: mapping[k] for k in mapping},
        "mapping_used": {k: (None if v is None else cls_names[v]) for k, v in sorted(targets.items())},
        "holdout_per_class": holdout,
        "sources": sources,
        "tiles": {
            "train": sorted(t.rel for ts in train_tiles.values() for t in ts),
            "holdout": held,
            "left_out": sorted(t.rel for t in tiles if targets[t.cls] is None),
        },
        "tiles_used": {split: sorted(rels) for split, rels in used.items()},
        "params": params,
        "counts": counts,
        "attribution": "Mosaics derived from tiles by Kather et al. (CC BY 4.0): see sources[*].citation. "
                       "The derived images are shared under the same licence with this attribution.",
        "note": "test mosaics use held-out tiles only; val uses " +
                ("training tiles (new layouts)" if params["val_from"] == "train" else "held-out tiles"),
    }
