"""Reading: the pixels one chunk needs, decoded on the engine's threads, one slide handle each.

A chunk's tiles lie on the global tile grid and reach past the chunk by the tile margin; one
``read_region`` at the model's mpp fetches their bounding box (and the whole chunk when an
output stores the image), so each level-0 pixel is decoded once per chunk, in large reads.

How many threads decode at once (:func:`read_threads`): measured on the H200 machine this
project borrows (16 cores, random 512-px regions): OpenSlide scales with threads when each has
its own handle (843 / 2,105 / 3,430 / 3,450 tiles/s at 1 / 4 / 8 / 16 threads), tiffslide does
not (1,554 / 1,591 / 1,788 / 1,570: its decoding holds a lock per handle and the GIL around
tifffile's Python). So with the model on a GPU the engine gives the reading up to 8 threads
for OpenSlide and 2 for tiffslide (``--backend auto`` prefers OpenSlide for that reason); with
the model on a CPU, one thread reads ahead while the model takes the cores.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from wsiproto.segment.grid import Chunk

# Reading threads that still pay off, per backend (measured, see the module doc).
SCALING_THREADS = {"openslide": 8, "tiffslide": 2}


def read_threads(backend: str, model_on_gpu: bool, cores: int | None = None) -> int:
    """Threads that decode chunks at once: 1 beside a model on the CPU; on a GPU as many as
    the backend scales to, leaving two cores to the model's thread and the exports."""
    if not model_on_gpu:
        return 1
    cores = cores or os.cpu_count() or 1
    return max(1, min(SCALING_THREADS.get(backend, 4), cores - 2))


@dataclass
class ChunkInput:
    """A chunk's pixels: the tissue tiles' label-frame positions and the region that holds
    them (its top-left at label px ``(ry0, rx0)``); ``region`` is None when the chunk needs no
    pixels (no tissue, no image output). ``inside``: tissue within the ROI, at label
    resolution (set by the engine)."""

    chunk: Chunk
    positions: list[tuple[int, int]]
    region: np.ndarray | None
    ry0: int = 0
    rx0: int = 0
    inside: np.ndarray | None = None  # bool [h, w]: where the chunk's labels may go

    def tiles(self, group: list[tuple[int, int]], t: int) -> np.ndarray:
        """The tiles at ``group`` positions, cut from the region: uint8 [n, t, t, 3]."""
        out = np.empty((len(group), t, t, 3), np.uint8)
        for i, (ty, tx) in enumerate(group):
            y, x = ty - self.ry0, tx - self.rx0
            out[i] = self.region[y : y + t, x : x + t]
        return out

    def chunk_rgb(self) -> np.ndarray:
        """The chunk's own pixels (a view of the region)."""
        c = self.chunk
        y, x = c.y0 - self.ry0, c.x0 - self.rx0
        return self.region[y : y + c.height, x : x + c.width]


class SlidePool:
    """One Slide handle per thread (a clone of the run's), so threads decode in parallel."""

    def __init__(self, slide):
        self._slide = slide
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def get(self):
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._slide.clone()
            self._local.slide = slide
            with self._lock:
                self._all.append(slide)
        return slide

    def close(self) -> None:
        with self._lock:
            handles, self._all = self._all, []
        for s in handles:
            s.close()


def region_box(chunk: Chunk, positions, tile: int, margin: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) in label px: the tiles' bounding box and the chunk's own rectangle
    grown by ``margin``."""
    boxes = [(ty, tx, ty + tile, tx + tile) for ty, tx in positions]
    boxes.append((chunk.y0 - margin, chunk.x0 - margin, chunk.y0 + chunk.height + margin,
                  chunk.x0 + chunk.width + margin))
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def read_chunk(plan, pool: SlidePool, chunk: Chunk, need_image: bool, clock=None) -> ChunkInput:
    """Decode what ``chunk`` needs: its tissue tiles' region and the chunk itself with the
    margin its tissue edge needs; a chunk without tissue only when ``need_image``.
    ``clock``: a callable(name, thread-seconds) to account the work."""
    t0 = time.thread_time()
    positions = plan.tissue_tiles(chunk)
    if not positions and not need_image:
        return ChunkInput(chunk, [], None)
    # tissue: the chunk and the context its tissue edge needs; else the chunk for its image
    margin = plan.edge_margin if positions else 0
    y0, x0, y1, x1 = region_box(chunk, positions, plan.grid.tile, margin)
    s = plan.scale
    region = pool.get().read_region((x0 * s, y0 * s), (x1 - x0, y1 - y0), mpp=plan.model_mpp)
    if clock is not None:
        clock("read_s", time.thread_time() - t0)
    return ChunkInput(chunk, positions, region, y0, x0)


__all__ = ["ChunkInput", "SCALING_THREADS", "SlidePool", "read_chunk", "read_threads",
           "region_box"]
