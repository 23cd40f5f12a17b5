"""The numpy blending and argmax of wsiproto 0.1's pipeline (before scores stayed on the
device), kept as the reference the device-side canvas must reproduce exactly."""

from __future__ import annotations

import numpy as np

from wsiproto.segment.grid import blend_window


def blend_tiles(scores: np.ndarray, positions, origin, shape, overlap: int):
    """Weighted sum of tile scores [N, K+1, t, t] on a canvas of ``shape`` at ``origin``:
    (sum of window x scores [K+1, h, w], sum of windows [h, w])."""
    n, k1, t, _ = scores.shape
    h, w = shape
    acc = np.zeros((k1, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    win = blend_window(t, overlap)
    oy, ox = origin
    for i, (ty, tx) in enumerate(positions):
        y0, x0 = ty - oy, tx - ox
        cy0, cx0 = max(y0, 0), max(x0, 0)
        cy1, cx1 = min(y0 + t, h), min(x0 + t, w)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        sy, sx = slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)
        part = scores[i][:, sy, sx].copy()
        part *= win[sy, sx]
        acc[:, cy0:cy1, cx0:cx1] += part
        wsum[cy0:cy1, cx0:cx1] += win[sy, sx]
    return acc, wsum


def labels_of(acc: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """1 + argmax over channels (ties to the first), 0 where no tile reached."""
    return ((np.argmax(acc, axis=0) + 1) * (wsum > 0)).astype(np.uint8)
