"""OME-Zarr writer for the class-label pyramid of one slide, written chunk by chunk.

Layout of one store (the root is an NGFF *image* group)::

    <stem>.ome.zarr/
      0 .. n-1            RGB image of the slide at the segmentation resolution, axes (c, y, x),
                          uint8, chunks (3, chunk, chunk); levels 1.. by 2x mean downsampling
      labels/             labels group, ``labels: ["tissue"]``
        tissue/0 .. n-1   class labels, axes (y, x), uint8, chunks (chunk, chunk); levels 1.. by
                          2x mode downsampling; ``image-label`` colors/properties from the class
                          table, ``source.image = "../../"``
      probabilities/      only with ``probabilities=True``: its own NGFF image group, axes
        0 .. n-1          (c, y, x), one channel per class (values 1..K in order), uint8 0..255,
                          levels by 2x mean downsampling

Choices:

* NGFF 0.5 (zarr v3, metadata under the ``ome`` attribute, ``dimension_names`` on every array)
  by default; NGFF 0.4 (zarr v2, ``.zattrs``, ``/`` chunk-key separator) with
  ``ngff_version="0.4"`` for QuPath and other Java readers.
* Every level of the labels and probabilities has the same shape and ``scale`` as the image
  level with the same index: ``scale = [1, mpp * 2**k, mpp * 2**k]`` (c, y, x) in micrometer,
  ``[mpp * 2**k] * 2`` for the labels; no translation. Level k has shape ``ceil(H / 2**k)`` by
  ``ceil(W / 2**k)``; levels stop at the first one whose longer side is <= 1024 px.
* The label arrays are 2-D (y, x). The NGFF layout note that a label dimension "should" match
  the image or be 1 is informative; ome-zarr-models and ome-zarr-py both accept (y, x) labels
  for a (c, y, x) image, and 2-D labels are what every consumer here reads.
* Label value 0 means unlabelled and is listed in ``colors`` as transparent. Mode downsampling
  takes the most frequent value of each 2x2 block; ties go to a non-zero value over 0 and then
  to the smaller value, so 0 only wins a block where it has the strict majority (or the block
  is all 0). At odd edges only the pixels present are counted (means likewise).
* Fill values: labels and probabilities 0; image 255 (white glass), so unwritten image chunks
  look like an empty slide in viewers. With ``image=False`` the image arrays still exist (the
  labels must annotate an image) but are never written: they cost no storage and read white.
* Compression: zarr's default codecs (zstd for zarr v3; blosc-lz4 for zarr v2, which the Java
  readers support).
* ``finalize`` writes the NGFF metadata; until then the store carries only our own
  ``wsiproto`` attribute (the writer's configuration), which ``SlidePyramidWriter.open`` uses
  to resume an unfinished store.

Thread safety: writes from several threads are safe when they touch DIFFERENT chunks, which is
the case when every write region is chunk-aligned (its origin a multiple of ``chunk``, its size
a multiple of ``chunk`` or reaching the array edge). Unaligned concurrent writes that share a
chunk race (read-modify-write of the chunk) and are NOT safe. ``build_pyramid`` only ever writes
whole output chunks.

Blocks: ``write_block`` writes one aligned block of level 0 *and* the first pyramid levels that
lie inside it (``inline_levels``: level k needs the block to span whole chunks of level k, i.e.
a multiple of ``chunk * 2**k``), from the block in memory, so a segmentation run builds most of
its pyramid inside the chunk tasks; ``build_pyramid(start=...)`` then only makes the small
levels above. The result is identical to building every level afterwards.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsiproto.errors import WsiprotoError

LABEL_NAME = "tissue"
MAX_TOP_LEVEL = 1024
IMAGE_FILL = 255
VERSIONS = ("0.5", "0.4")

ClassTable = list[tuple[int, str, tuple[int, int, int]]]


def level_shapes(height: int, width: int, max_side: int = MAX_TOP_LEVEL) -> list[tuple[int, int]]:
    """Shapes of levels 0, 1, ... (each ceil-halved) down to the first with longer side <= max_side."""
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) > max_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _pad_to_even(block: np.ndarray, fill) -> np.ndarray:
    """Pad the last two axes of ``block`` to even sizes with ``fill``."""
    h, w = block.shape[-2:]
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return block
    pad = [(0, 0)] * (block.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(block, pad, constant_values=fill)


def _mode_general(labels: np.ndarray) -> np.ndarray:
    """``mode_downsample`` of any shape (odd edges padded with a value that never wins)."""
    x = _pad_to_even(labels.astype(np.int16), -1)
    corners = [x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]]
    best_score = best_value = None
    for i, v in enumerate(corners):
        count = np.ones(v.shape, np.int16)
        for j, other in enumerate(corners):
            if j != i:
                count += v == other
        score = count * 512 + (v != 0) * 256 + (255 - v)
        score[v < 0] = -1  # padding never wins
        if best_score is None:
            best_score, best_value = score, v.copy()
        else:
            better = score > best_score
            best_score = np.where(better, score, best_score)
            best_value = np.where(better, v, best_value)
    return best_value.astype(labels.dtype)


def _mode4(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The mode of four uint8 arrays, element-wise, with ``mode_downsample``'s tie rules:
    each candidate scores ``count * 512 + (value != 0) * 256 + (255 - value)`` and the value
    is read back from the highest score (no per-element selection)."""
    ab, ac, ad = a == b, a == c, a == d
    bc, bd, cd = b == c, b == d, c == d
    best = None
    for v, e1, e2, e3 in ((a, ab, ac, ad), (b, ab, bc, bd), (c, ac, bc, cd), (d, ad, bd, cd)):
        score = (e1.view(np.uint8) + e2.view(np.uint8) + e3.view(np.uint8)).astype(np.uint16)
        score += 1
        score <<= 9
        score |= np.where(v == 0, np.uint16(255), np.uint16(511) - v)
        best = score if best is None else np.maximum(best, score, out=best)
    return (255 - (best & 255)).astype(np.uint8)


_MODE_LUTS: dict[int, np.ndarray] = {}


def _mode_lut(base: int) -> np.ndarray:
    """The mode of every 2x2 block of values < ``base``, indexed by the block's base-``base``
    code ``((a * base + b) * base + c) * base + d``."""
    lut = _MODE_LUTS.get(base)
    if lut is None:
        code = np.arange(base**4)
        a, b, c, d = (((code // base**k) % base).astype(np.uint8) for k in (3, 2, 1, 0))
        lut = _MODE_LUTS[base] = _mode4(a, b, c, d)
    return lut


def mode_downsample(labels: np.ndarray) -> np.ndarray:
    """2x mode downsampling of an integer label map [h, w] (uint8 values).

    Each output pixel is the most frequent value of its 2x2 block (fewer pixels at odd edges).
    Ties: a non-zero value beats 0, then the smaller value wins. Label maps with few values
    (< 16, the usual class tables) go through a lookup table of all 2x2 blocks; others
    through :func:`_mode4`. Odd edges go through a padded version of the same rule.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    h, w = labels.shape
    he, we = h - h % 2, w - w % 2
    out = np.empty(((h + 1) // 2, (w + 1) // 2), labels.dtype)
    if he and we:
        x = labels[:he, :we].astype(np.uint8, copy=False)
        q = np.ascontiguousarray(x.reshape(he // 2, 2, we // 2, 2).transpose(1, 3, 0, 2))
        a, b, c, d = q[0, 0], q[0, 1], q[1, 0], q[1, 1]
        top = int(q.max())
        if top < 16:
            base = top + 1
            code = a.astype(np.uint16)
            for v in (b, c, d):
                code *= base
                code += v
            out[: he // 2, : we // 2] = _mode_lut(base)[code]
        else:
            out[: he // 2, : we // 2] = _mode4(a, b, c, d)
    if h % 2:
        out[-1, :] = _mode_general(labels[he:, :])[0]
    if w % 2:
        out[:, -1] = _mode_general(labels[:, we:])[:, 0]
    return out


def mean_downsample(block: np.ndarray) -> np.ndarray:
    """2x mean downsampling over the last two axes of a uint8 array [..., h, w], rounded
    half up (fewer pixels at odd edges)."""
    h, w = block.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:  # the common case: integer sums, exact rounding
        total = block[..., 0::2, 0::2].astype(np.uint16)
        total += block[..., 0::2, 1::2]
        total += block[..., 1::2, 0::2]
        total += block[..., 1::2, 1::2]
        total += 2
        return (total >> 2).astype(np.uint8)
    x = _pad_to_even(block.astype(np.float32), np.nan)
    h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
    x = x.reshape(*x.shape[:-2], h2, 2, w2, 2)
    mean = np.nanmean(x, axis=(-3, -1))
    return np.floor(mean + 0.5).astype(np.uint8)


class SlidePyramidWriter:
    """Chunk-wise writer of the image, class-label and probability pyramids (see module doc).

    ``classes``: list of ``(value, name, (r, g, b))`` for label values 1..K; 0 is unlabelled.
    The caller writes level 0 (``write_labels``/``write_image``/``write_probabilities``), then
    calls ``build_pyramid`` and ``finalize``. The store is created at ``path``; the caller may
    write to a temporary path and rename it when finished.
    """

    def __init__(self, path, *, height: int, width: int, mpp: float, classes: ClassTable,
                 ngff_version: str = "0.5", chunk: int = 512, probabilities: bool = False,
                 image: bool = True, name: str | None = None, overwrite: bool = False,
                 _create: bool = True):
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.mpp = float(mpp)
        self.classes = [(int(v), str(n), tuple(int(c) for c in rgb)) for v, n, rgb in classes]
        self.ngff_version = str(ngff_version)
        self.chunk = int(chunk)
        self.probabilities = bool(probabilities)
        self.image = bool(image)
        self.name = name if name is not None else self.path.name.removesuffix(".ome.zarr")
        self._validate()
        self.shapes = level_shapes(self.height, self.width)
        if _create:
            self._create_store(overwrite)
        self.root = zarr.open_group(str(self.path), mode="r+", zarr_format=self._zarr_format)
        self._arrays: dict[tuple[str, int], Any] = {}  # write_block's arrays, opened once
        self._arrays_lock = threading.Lock()

    # ------------------------------------------------------------------ creation / reopening
    def _validate(self) -> None:
        if self.ngff_version not in VERSIONS:
            raise WsiprotoError(f"unsupported NGFF version {self.ngff_version!r}",
                                path=self.path, hint="use 0.5 (default) or 0.4")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"label map size must be positive, got {self.height}x{self.width}")
        if not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ValueError(f"mpp must be a positive number, got {self.mpp}")
        if self.chunk < 16:
            raise ValueError(f"chunk must be >= 16 px, got {self.chunk}")
        values = [v for v, _, _ in self.classes]
        if not values or len(set(values)) != len(values) or not all(1 <= v <= 255 for v in values):
            raise ValueError(f"class values must be unique integers in 1..255, got {values}")

    @property
    def _zarr_format(self) -> int:
        return 3 if self.ngff_version == "0.5" else 2

    def _config(self) -> dict:
        return {
            "height": self.height, "width": self.width, "mpp": self.mpp,
            "classes": [[v, n, list(c)] for v, n, c in self.classes],
            "ngff_version": self.ngff_version, "chunk": self.chunk,
            "probabilities": self.probabilities, "image": self.image, "name": self.name,
            "finalized": False,
        }

    def _create_store(self, overwrite: bool) -> None:
        if self.path.exists():
            if not overwrite:
                raise WsiprotoError("output store already exists", path=self.path,
                                    hint="pass overwrite=True (--overwrite) or remove it")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        root = zarr.open_group(str(self.path), mode="w", zarr_format=self._zarr_format)
        root.attrs["wsiproto"] = self._config()
        self._create_levels(root, 3, IMAGE_FILL, ("c", "y", "x"))
        labels = root.create_group("labels").create_group(LABEL_NAME)
        self._create_levels(labels, None, 0, ("y", "x"))
        if self.probabilities:
            self._create_levels(root.create_group("probabilities"), len(self.classes), 0,
                                ("c", "y", "x"))

    def _create_levels(self, group, channels: int | None, fill: int, dims: tuple[str, ...]) -> None:
        for k, (h, w) in enumerate(self.shapes):
            shape = (h, w) if channels is None else (channels, h, w)
            chunks = (self.chunk, self.chunk) if channels is None else (
                channels if channels <= 4 else 1, self.chunk, self.chunk)
            extra = ({"dimension_names": dims} if self._zarr_format == 3
                     else {"chunk_key_encoding": {"name": "v2", "separator": "/"}})
            group.create_array(str(k), shape=shape, chunks=chunks, dtype="uint8",
                               fill_value=fill, **extra)

    @classmethod
    def open(cls, path) -> SlidePyramidWriter:
        """Reopen a store created by this class (finished or not) to resume writing."""
        path = Path(path)
        try:
            attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
            cfg = attrs["wsiproto"]
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as err:
            raise WsiprotoError("not an OME-Zarr store written by wsiproto", path=path,
                                hint="delete it and start again") from err
        writer = cls(path, height=cfg["height"], width=cfg["width"], mpp=cfg["mpp"],
                     classes=[(v, n, tuple(c)) for v, n, c in cfg["classes"]],
                     ngff_version=cfg["ngff_version"], chunk=cfg["chunk"],
                     probabilities=cfg["probabilities"], image=cfg["image"], name=cfg["name"],
                     _create=False)
        return writer

    # ------------------------------------------------------------------ arrays and levels
    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    def label_array(self, level: int = 0):
        return self.root[f"labels/{LABEL_NAME}/{level}"]

    def image_array(self, level: int = 0):
        return self.root[str(level)]

    def probability_array(self, level: int = 0):
        if not self.probabilities:
            raise ValueError("this store was created without probabilities")
        return self.root[f"probabilities/{level}"]

    def _block_array(self, kind: str, level: int):
        """The array a block writer writes to, opened once (opening reads its metadata) and
        configured to store every chunk it is given: zarr's own test for chunks equal to the
        fill value costs as much as compressing them, and the chunks of a tissue block are
        rarely empty."""
        key = (kind, level)
        with self._arrays_lock:
            arr = self._arrays.get(key)
            if arr is None:
                get = {"labels": self.label_array, "image": self.image_array,
                       "probabilities": self.probability_array}[kind]
                arr = self._arrays[key] = get(level).with_config({"write_empty_chunks": True})
        return arr

    def read_level(self, level: int) -> np.ndarray:
        """The whole label array of one level. Meant for small levels (the top is <= 1024 px)."""
        return self.label_array(level)[...]

    # ------------------------------------------------------------------ level-0 writes
    def _region(self, y0: int, x0: int, h: int, w: int) -> tuple[slice, slice]:
        if y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
            raise ValueError(f"region ({y0}, {x0}) + ({h}, {w}) lies outside the "
                             f"{self.height}x{self.width} label map")
        return slice(y0, y0 + h), slice(x0, x0 + w)

    def write_labels(self, y0: int, x0: int, labels: np.ndarray) -> None:
        """Write uint8 labels [h, w] at level-0 position (y0, x0)."""
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype != np.uint8:
            raise ValueError(f"labels must be uint8 [h, w], got {labels.dtype} {labels.shape}")
        ys, xs = self._region(y0, x0, *labels.shape)
        self.label_array(0)[ys, xs] = labels

    def write_image(self, y0: int, x0: int, rgb: np.ndarray) -> None:
        """Write a uint8 RGB block [h, w, 3] at level-0 position (y0, x0)."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb must be uint8 [h, w, 3], got {rgb.dtype} {rgb.shape}")
        ys, xs = self._region(y0, x0, rgb.shape[0], rgb.shape[1])
        self.image_array(0)[:, ys, xs] = np.moveaxis(rgb, 2, 0)

    def write_probabilities(self, y0: int, x0: int, probs: np.ndarray) -> None:
        """Write uint8 class probabilities [K, h, w] (0..255) at level-0 position (y0, x0)."""
        probs = np.asarray(probs)
        k = len(self.classes)
        if probs.ndim != 3 or probs.shape[0] != k or probs.dtype != np.uint8:
            raise ValueError(f"probs must be uint8 [{k}, h, w], got {probs.dtype} {probs.shape}")
        ys, xs = self._region(y0, x0, probs.shape[1], probs.shape[2])
        self.probability_array(0)[:, ys, xs] = probs

    def inline_levels(self, block: int) -> int:
        """How many levels above 0 the writer of one level-0 ``block`` (a square of ``block``
        px at a multiple of ``block``) can compute and write itself, without touching zarr
        chunks of other blocks: level k needs ``block`` to be a multiple of ``chunk * 2**k``."""
        k = 0
        while k + 1 < self.num_levels and block % (self.chunk << (k + 1)) == 0:
            k += 1
        return k

    def write_block(self, y0: int, x0: int, labels: np.ndarray | None,
                    rgb: np.ndarray | None = None, probs: np.ndarray | None = None,
                    levels: int = 0) -> None:
        """Write one block of level 0 (labels, and the image [h, w, 3] / probabilities
        [K, h, w] when given) and its first ``levels`` pyramid levels (at most
        ``inline_levels(block)``; the block must start on that grid). ``build_pyramid(start=
        levels + 1)`` then only has to make the small levels above. ``labels=None``: the
        block has no labels (they stay 0, the fill value); the image is still written."""
        step = 1 << levels
        if y0 % (self.chunk * step) or x0 % (self.chunk * step):
            raise ValueError(f"block ({y0}, {x0}) is not aligned for {levels} inline levels")
        if labels is None and rgb is None:
            raise ValueError("write_block needs labels or an image")
        shape = np.shape(labels)[:2] if labels is not None else np.shape(rgb)[:2]
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 2 or labels.dtype != np.uint8:
                raise ValueError(f"labels must be uint8 [h, w], got {labels.dtype} {labels.shape}")
        img = None
        if rgb is not None:
            rgb = np.asarray(rgb)
            if rgb.shape != tuple(shape) + (3,) or rgb.dtype != np.uint8:
                raise ValueError(f"rgb must be uint8 {tuple(shape) + (3,)}, got {rgb.dtype} "
                                 f"{rgb.shape}")
            img = np.ascontiguousarray(np.moveaxis(rgb, 2, 0))
        if probs is not None:
            probs = np.asarray(probs)
            if probs.shape != (len(self.classes),) + tuple(shape) or probs.dtype != np.uint8:
                raise ValueError(f"probs must be uint8 [K, h, w], got {probs.dtype} {probs.shape}")
        lab = labels
        for k in range(levels + 1):
            y, x = y0 >> k, x0 >> k
            if k:
                lab = None if lab is None else mode_downsample(lab)
                img = None if img is None else mean_downsample(img)
                probs = None if probs is None else mean_downsample(probs)
            self._region(y << k, x << k, 1, 1)  # the origin lies inside level 0
            if lab is not None:
                self._block_array("labels", k)[y : y + lab.shape[0], x : x + lab.shape[1]] = lab
            if img is not None:
                self._write_chw(self._block_array("image", k), y, x, img)
            if probs is not None:
                self._write_chw(self._block_array("probabilities", k), y, x, probs)

    def _write_chw(self, arr, y0: int, x0: int, block: np.ndarray) -> None:
        if y0 + block.shape[1] > arr.shape[1] or x0 + block.shape[2] > arr.shape[2]:
            raise ValueError(f"block ({y0}, {x0}) + {block.shape} lies outside {arr.shape}")
        arr[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block

    # ------------------------------------------------------------------ reading back
    def _chunk_origins(self, level: int) -> Iterator[tuple[int, int]]:
        h, w = self.shapes[level]
        for y0 in range(0, h, self.chunk):
            for x0 in range(0, w, self.chunk):
                yield y0, x0

    def iter_label_chunks(self, level: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(y0, x0, labels)`` for every chunk of a label level, row by row."""
        arr = self.label_array(level)
        h, w = self.shapes[level]
        for y0, x0 in self._chunk_origins(level):
            yield y0, x0, arr[y0 : min(y0 + self.chunk, h), x0 : min(x0 + self.chunk, w)]

    # ------------------------------------------------------------------ pyramid
    def _pyramids(self) -> list[tuple[callable, callable, int]]:
        """(array getter, downsample function, fill) of every pyramid to build."""
        jobs = [(self.label_array, mode_downsample, 0)]
        if self.image:
            jobs.append((self.image_array, mean_downsample, IMAGE_FILL))
        if self.probabilities:
            jobs.append((self.probability_array, mean_downsample, 0))
        return jobs

    def _downsample_chunk(self, src, dst, fn, fill: int, y0: int, x0: int) -> None:
        c = self.chunk
        h, w = dst.shape[-2:]
        y1, x1 = min(y0 + c, h), min(x0 + c, w)
        block = src[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
        if (block == fill).all():  # empty source: skip the arithmetic, store nothing
            out = np.full(block.shape[:-2] + (y1 - y0, x1 - x0), fill, np.uint8)
        else:
            out = fn(block)
        if out.ndim == 2:
            dst[y0:y1, x0:x1] = out
        else:
            dst[:, y0:y1, x0:x1] = out

    def build_pyramid(self, num_workers: int = 1, start: int = 1) -> None:
        """Compute levels ``start``.. from the level below, one output chunk at a time
        (``start`` > 1 when ``write_block`` already wrote the levels below it).

        Each task reads the 2x2 source chunks under one output chunk and writes that chunk, so
        memory is bounded by ``num_workers`` x (4 source chunks) whatever the slide size.
        """
        workers = max(1, int(num_workers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for level in range(max(1, int(start)), self.num_levels):
                for get, fn, fill in self._pyramids():
                    src, dst = get(level - 1), get(level)
                    tasks = [pool.submit(self._downsample_chunk, src, dst, fn, fill, y0, x0)
                             for y0, x0 in self._chunk_origins(level)]
                    for task in tasks:
                        task.result()

    # ------------------------------------------------------------------ metadata
    def _scales(self, channel: bool) -> list[list[float]]:
        out = []
        for k in range(self.num_levels):
            s = self.mpp * 2**k
            out.append([1.0, s, s] if channel else [s, s])
        return out

    def _multiscale(self, name: str, channel: bool, method: str) -> dict:
        axes = [{"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"}]
        if channel:
            axes.insert(0, {"name": "c", "type": "channel"})
        datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": s}]}
                    for k, s in enumerate(self._scales(channel))]
        ms = {"name": name, "axes": axes, "datasets": datasets, "type": method,
              "metadata": {"description": f"2x {method} downsampling per level",
                           "method": "wsiproto.export.ngff"}}
        if self.ngff_version == "0.4":
            ms["version"] = "0.4"
        return ms

    def _omero(self, names: list[str], colors: list[str]) -> dict:
        channels = [{"label": n, "color": c, "active": True, "coefficient": 1.0,
                     "family": "linear", "inverted": False,
                     "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                    for n, c in zip(names, colors)]
        return {"name": self.name, "channels": channels, "rdefs": {"model": "color"}}

    def _image_label(self) -> dict:
        """Colours in ``colors`` only: ``properties`` hold scalars (a name per value), as
        napari turns them into a feature table column by column (a list-valued ``color``
        there made its Labels layer fail)."""
        colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
        props = [{"label-value": 0, "name": "unlabelled"}]
        for v, n, (r, g, b) in self.classes:
            colors.append({"label-value": v, "rgba": [r, g, b, 255]})
            props.append({"label-value": v, "name": n})
        meta = {"colors": colors, "properties": props, "source": {"image": "../../"}}
        if self.ngff_version == "0.4":
            meta["version"] = "0.4"
        return meta

    def _set_ngff(self, group, meta: dict) -> None:
        """Store NGFF metadata: under ``ome`` with a version for 0.5, at the top for 0.4."""
        if self.ngff_version == "0.5":
            group.attrs["ome"] = {"version": "0.5", **meta}
        else:
            group.attrs.update(meta)

    def finalize(self) -> None:
        """Write all NGFF metadata; afterwards the store validates as OME-Zarr."""
        self._set_ngff(self.root, {
            "multiscales": [self._multiscale(self.name, True, "mean")],
            "omero": self._omero(["red", "green", "blue"], ["FF0000", "00FF00", "0000FF"]),
        })
        self._set_ngff(self.root["labels"], {"labels": [LABEL_NAME]})
        self._set_ngff(self.root[f"labels/{LABEL_NAME}"], {
            "image-label": self._image_label(),
            "multiscales": [self._multiscale(LABEL_NAME, False, "mode")],
        })
        if self.probabilities:
            names = [n for _, n, _ in self.classes]
            colors = ["{:02X}{:02X}{:02X}".format(*rgb) for _, _, rgb in self.classes]
            self._set_ngff(self.root["probabilities"], {
                "multiscales": [self._multiscale("probabilities", True, "mean")],
                "omero": self._omero(names, colors),
            })
        cfg = dict(self.root.attrs["wsiproto"])
        cfg["finalized"] = True
        self.root.attrs["wsiproto"] = cfg


__all__ = ["LABEL_NAME", "SlidePyramidWriter", "level_shapes", "mean_downsample",
           "mode_downsample"]
