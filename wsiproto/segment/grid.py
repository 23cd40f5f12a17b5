"""The output grid of a segmentation run: label frame, chunks, and one global tile grid.

All positions here are pixels of the *label frame*: the slide's bounds-cropped frame resampled
to the model's mpp. A label pixel (y, x) covers level-0 pixels [x * scale, (x + 1) * scale) with
``scale = model_mpp / slide_mpp``.

Seamless by construction: tiles sit on one global grid (origin ``-pad``, step ``stride``), and
a chunk runs every global tile that intersects it. So every label pixel is the same weighted
blend of the same tiles whichever chunk computes it, and results do not depend on the chunking:
there is no seam to hide. The price is that tiles straddling a chunk border run once per chunk
they touch (``ChunkGrid.duplicate_fraction``); large chunks keep it small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """One output chunk: label-frame rectangle [y0, y0 + height) x [x0, x0 + width)."""

    iy: int
    ix: int
    y0: int
    x0: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.iy}_{self.ix}"


@dataclass(frozen=True)
class ChunkGrid:
    """Label frame of ``height`` x ``width`` cut into ``chunk`` x ``chunk`` pieces, and the
    global tile grid (``tile`` px tiles every ``stride`` px, first tile at ``-pad``)."""

    height: int
    width: int
    chunk: int
    tile: int
    overlap: int

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile) (got {self.overlap}, tile {self.tile})")
        if self.chunk <= 0 or self.tile <= 0:
            raise ValueError("chunk and tile sizes must be positive")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def pad(self) -> int:
        # Centre the overlap on the frame's edge so that border pixels get a full blend.
        return self.overlap // 2

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk)

    def chunks(self) -> Iterator[Chunk]:
        ny, nx = self.shape
        for iy in range(ny):
            for ix in range(nx):
                y0, x0 = iy * self.chunk, ix * self.chunk
                yield Chunk(iy, ix, y0, x0, min(self.chunk, self.height - y0),
                            min(self.chunk, self.width - x0))

    def _tile_range(self, start: int, stop: int, extent: int) -> range:
        """Indices k of tiles [k*stride - pad, k*stride - pad + tile) meeting [start, stop)."""
        s, t, p = self.stride, self.tile, self.pad
        k0 = max(0, math.floor((start + p - t) / s) + 1)
        # The last tile needed to cover the frame's end; no tile starts beyond it.
        k_last = max(0, math.ceil((extent + p - t) / s))
        k1 = min(k_last, math.floor((stop - 1 + p) / s))
        return range(k0, k1 + 1)

    def tiles_for(self, chunk: Chunk) -> list[tuple[int, int]]:
        """Top-left (y, x) label-frame positions of the global tiles that meet ``chunk``."""
        s, p = self.stride, self.pad
        ys = self._tile_range(chunk.y0, chunk.y0 + chunk.height, self.height)
        xs = self._tile_range(chunk.x0, chunk.x0 + chunk.width, self.width)
        return [(ky * s - p, kx * s - p) for ky in ys for kx in xs]

    def total_tiles(self) -> int:
        """Tiles in the global grid over the whole frame (each run once by a whole-frame pass)."""
        ny = len(self._tile_range(0, self.height, self.height))
        nx = len(self._tile_range(0, self.width, self.width))
        return ny * nx

    def duplicate_fraction(self) -> float:
        """Extra tile runs caused by chunking, relative to one whole-frame pass."""
        runs = sum(len(self.tiles_for(c)) for c in self.chunks())
        total = self.total_tiles()
        return runs / total - 1.0 if total else 0.0


def blend_window(tile: int, overlap: int, floor: float = 1e-3) -> np.ndarray:
    """Per-pixel blending weight of a tile: 1 in the middle, ramping linearly over the overlap
    to ``floor`` at the border (never zero, so a pixel seen by one tile only keeps its value)."""
    if overlap <= 0:
        return np.ones((tile, tile), np.float32)
    ramp = np.ones(tile, np.float32)
    edge = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    ramp[:overlap] = np.maximum(edge, floor)
    ramp[tile - overlap :] = np.maximum(edge[::-1], floor)
    return np.outer(ramp, ramp)
