"""Synthetic pyramidal slides for tests and benchmarks (no real tissue, known layout).

``write_pyramidal_tiff`` writes an Aperio-style tiled TIFF (JPEG tiles, levels as top-level
pages, ``MPP``/``AppMag`` in the description and resolution tags) that OpenSlide and tiffslide
both open. Pixels come from a ``render(x, y, w, h) -> uint8 [h, w, 3]`` function of level-0
coordinates and are produced tile by tile, so memory stays bounded by one tile row whatever the
slide size. Lower levels are box averages of the level-0 rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

Render = Callable[[int, int, int, int], np.ndarray]


def _level_tiles(render: Render, width: int, height: int, ds: int, tile: int) -> Iterator[np.ndarray]:
    lw, lh = width // ds, height // ds
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            th, tw = min(tile, lh - ty), min(tile, lw - tx)
            px = render(tx * ds, ty * ds, tw * ds, th * ds)
            if ds > 1:
                px = px.reshape(th, ds, tw, ds, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[:th, :tw] = px
            yield out


def write_pyramidal_tiff(
    path: str | Path,
    width: int,
    height: int,
    render: Render,
    *,
    mpp: float | None = 0.5,
    levels: int = 3,
    tile: int = 256,
    quality: int = 90,
    aperio: bool = True,
) -> Path:
    """Write a tiled JPEG pyramid with ``levels`` levels (downsamples 1, 4, 16, ...; 2x per step
    for small slides) and return its path. ``mpp=None`` writes no pixel size at all."""
    import tifffile

    path = Path(path)
    factor = 4 if min(width, height) // 4 ** (levels - 1) >= tile else 2
    downsamples = [factor**i for i in range(levels)]
    mag = None if mpp is None else 10.0 / mpp
    bigtiff = width * height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for i, ds in enumerate(downsamples):
            lw, lh = width // ds, height // ds
            if aperio:
                desc = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                if i:
                    desc += f" -> {lw}x{lh}"
                if mpp is not None:
                    desc += f"|AppMag = {mag:g}|MPP = {mpp:g}"
            else:
                desc = None
            kwargs = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)
                kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(
                _level_tiles(render, width, height, ds, tile),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                description=desc,
                metadata=None,
                **kwargs,
            )
            if aperio and i == 0:
                # Real SVS files hold a stripped thumbnail as their second page; readers
                # (tifffile's SVS series, OpenSlide's aperio driver) count on it.
                thumb = _thumbnail(render, width, height)
                tw.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    rowsperstrip=16,
                    description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> "
                    f"{thumb.shape[1]}x{thumb.shape[0]} - ",
                    metadata=None,
                )
    return path


def _thumbnail(render: Render, width: int, height: int, max_size: int = 1024) -> np.ndarray:
    """Point-sampled thumbnail, one rendered level-0 row per thumbnail row."""
    step = max(1, -(-max(width, height) // max_size))
    rows = [render(0, y, width, 1)[0, ::step] for y in range(0, height, step)]
    return np.ascontiguousarray(np.stack(rows))


def blob_layout(width: int, height: int, seed: int = 0) -> Render:
    """A render function: white glass with two H&E-coloured tissue pieces (a rectangle and a
    disk, both textured) and a green pen stroke on the glass. ``blob_layout.truth(x, y)``
    (attached to the function) gives the boolean tissue layout at level-0 coordinates."""
    rng = np.random.default_rng(seed)
    rect = (int(0.10 * width), int(0.15 * height), int(0.45 * width), int(0.70 * height))
    cx, cy, r = int(0.72 * width), int(0.45 * height), int(0.18 * min(width, height))
    pen = (int(0.60 * width), int(0.82 * height), int(0.95 * width), int(0.88 * height))
    phase = rng.uniform(0, 2 * np.pi, size=4)

    def truth(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        in_rect = (xx >= rect[0]) & (xx < rect[2]) & (yy >= rect[1]) & (yy < rect[3])
        in_disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        return in_rect | in_disk

    def render(x: int, y: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y : y + h, x : x + w]
        tissue = truth(xx, yy)
        in_pen = (xx >= pen[0]) & (xx < pen[2]) & (yy >= pen[1]) & (yy < pen[3])
        # A smooth texture (JPEG keeps it well, so reads can be compared with the truth).
        t = 0.5 + 0.25 * np.sin(xx / 23.0 + phase[0]) * np.cos(yy / 17.0 + phase[1]) \
            + 0.25 * np.sin((xx + yy) / 41.0 + phase[2])
        out = np.empty((h, w, 3), np.float32)
        out[...] = (242, 242, 244)
        pink = np.stack([225 - 60 * t, 140 - 70 * t, 190 - 20 * t], axis=-1)
        out[tissue] = pink[tissue]
        out[in_pen & ~tissue] = (40, 150, 90)
        return out.round().clip(0, 255).astype(np.uint8)

    render.truth = truth  # type: ignore[attr-defined]
    return render
