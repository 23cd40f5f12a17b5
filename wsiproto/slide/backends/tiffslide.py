"""tiffslide (tifffile + zarr): the fallback for local TIFF-family slides, in pure Python.

It reads what tifffile reads (Aperio SVS, generic and OME pyramidal TIFF, Leica SCN, Ventana
BIF, Hamamatsu NDPI, QPTIFF) including files OpenSlide refuses (e.g. stripped levels).
Over URLs it is the ``remote`` backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsiproto.slide.backends.base import Backend, Target
from wsiproto.slide.backends.openslide_api import OpenSlideAPIReader
from wsiproto.slide.backends.registry import register

SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".svslide")


class TiffSlideReader(OpenSlideAPIReader):
    prefix = "tiffslide"

    def _open_handle(self, target: Target) -> Any:
        import tiffslide

        return tiffslide.TiffSlide(target.location)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> Any:
        """As OpenSlide: a tile the file lists with no bytes (a sparse TIFF, a scanner's
        skipped tile) is transparent, so ``Slide`` fills it; tiffslide would return black."""
        ds = self.level_downsamples[level]
        rgb = self.handle.read_region((int(round(x * ds)), int(round(y * ds))), level,
                                      (width, height), as_array=True)
        missing = self._missing_tiles(level)
        if missing is None:
            return rgb
        grid, (th, tw) = missing
        rows = slice(y // th, (y + height - 1) // th + 1)
        cols = slice(x // tw, (x + width - 1) // tw + 1)
        if not grid[rows, cols].any():
            return rgb
        # Per pixel: is its tile missing? (tile index of each row and column of the region)
        hole = grid[np.arange(y, y + height)[:, None] // th, np.arange(x, x + width)[None, :] // tw]
        alpha = np.where(hole, 0, 255).astype(np.uint8)
        return np.dstack([rgb[..., :3], alpha])

    def _missing_tiles(self, level: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        """(tiles-down x tiles-across bool grid of empty tiles, tile size) or None."""
        cache = self.__dict__.setdefault("_missing", {})
        if level not in cache:
            cache[level] = self._find_missing_tiles(level)
        return cache[level]

    def _find_missing_tiles(self, level: int) -> tuple[np.ndarray, tuple[int, int]] | None:
        idx = self.handle.properties.get("tiffslide.series-index", 0)
        page = self.handle.ts_tifffile.series[idx].levels[level].keyframe
        if not page.is_tiled:
            return None
        th, tw = int(page.tilelength), int(page.tilewidth)
        rows, cols = -(-int(page.imagelength) // th), -(-int(page.imagewidth) // tw)
        counts = np.asarray(page.databytecounts)
        if counts.size != rows * cols or counts.all():
            return None
        return (counts == 0).reshape(rows, cols), (th, tw)


register(Backend(
    name="tiffslide", priority=20, reader=TiffSlideReader,
    kinds=frozenset({"file"}), suffixes=SUFFIXES,
    requires=("tiffslide",), install="pip install tiffslide",
    summary="tiffslide: TIFF-family slides (SVS, TIFF, OME-TIFF, SCN, BIF, NDPI, QPTIFF)",
))
