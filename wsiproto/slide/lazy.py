"""A slide as a lazy ``dask.array`` at a chosen pixel size, for users who compute on slides
with dask: ``Slide.to_dask(mpp=0.5)`` -> ``[height, width, 3]`` uint8, one task per block.

Each block is one ``read_region`` of the slide at that pixel size (the same pixels as reading
the whole frame at once: the bounds-cropped frame, the fill value outside it). A task reads
through a handle of its own thread (a clone of the slide, opened on first use), so the
threaded scheduler decodes blocks in parallel; under dask.distributed the slide travels as
its source and reopens on the worker. Nothing is read until the array is computed.
"""

from __future__ import annotations

import math
import threading

import numpy as np

_local = threading.local()


def _handle(slide):
    """This thread's handle on ``slide`` (a clone, kept for the thread's next blocks)."""
    handles = _local.__dict__.setdefault("handles", {})
    key = (slide.source, slide.backend, slide.user_mpp, slide.fill)
    if key not in handles:
        handles[key] = slide.clone()
    return handles[key]


def _read_block(slide, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
    return _handle(slide).read_region((x0, y0), (w, h), downsample=ds)


def slide_to_dask(slide, mpp: float | None = None, downsample: float | None = None,
                  chunk: int = 2048):
    """The bounds-cropped frame at ``mpp`` um/px (or ``downsample`` level-0 px per px; neither:
    level 0) as a dask array [height, width, 3] of ``chunk`` x ``chunk`` blocks."""
    import dask
    import dask.array as da

    if mpp is not None and downsample is not None:
        raise ValueError("give mpp or downsample, not both")
    ds = slide.downsample_for_mpp(mpp) if mpp is not None else float(downsample or 1.0)
    if not ds > 0:
        raise ValueError("downsample must be positive")
    fw, fh = slide.size
    width, height = max(1, math.ceil(fw / ds)), max(1, math.ceil(fh / ds))
    read = dask.delayed(_read_block, pure=True)
    rows = []
    for y in range(0, height, chunk):
        h = min(chunk, height - y)
        row = []
        for x in range(0, width, chunk):
            w = min(chunk, width - x)
            block = read(slide, x * ds, y * ds, w, h, ds,
                         dask_key_name=f"slide-{id(slide):x}-{ds:g}-{y}-{x}")
            row.append(da.from_delayed(block, shape=(h, w, 3), dtype=np.uint8))
        rows.append(row)
    return da.concatenate([da.concatenate(row, axis=1) for row in rows], axis=0)


__all__ = ["slide_to_dask"]
