"""A deterministic stand-in for the segmentation model, and slides with a known class layout.

The stand-in classifies pixels by the nearest reference colour after a box blur computed inside
each tile (the tile border sees less context, as a real network's does), so tiling, blending,
stitching and export are tested against an exactly known answer without training anything.
"""

from __future__ import annotations

import numpy as np

# H&E-like colours that the tissue detector accepts (green channel smallest, no pen rule hit).
CLASSES = [("TUM", (235, 160, 205)), ("STR", (120, 60, 165)), ("LYM", (200, 90, 120))]
GLASS = (242, 242, 244)


class ColourStandIn:
    def __init__(self, tile_size: int = 128, mpp: float = 0.5, blur: int = 7):
        self.tile_size = tile_size
        self.mpp = mpp
        self.blur = blur
        self.classes = [(n, c) for n, c in CLASSES]
        self.background = ("background", (255, 255, 255))
        self.num_classes = len(CLASSES)
        self.calls = 0
        refs = [c for _, c in CLASSES] + [GLASS]
        self._refs = np.asarray(refs, np.float32)

    def describe(self) -> dict:
        return {"name": "colour-standin", "tile": self.tile_size, "mpp": self.mpp,
                "blur": self.blur}

    def predict_scores(self, tiles):
        """uint8 tiles [N, t, t, 3] (a CPU tensor, as the pipeline hands them) -> float32
        scores [N, 4, t, t] (a CPU tensor)."""
        import torch

        return torch.from_numpy(self.scores(np.asarray(tiles)))

    def scores(self, tiles: np.ndarray) -> np.ndarray:
        from scipy.ndimage import uniform_filter

        self.calls += 1
        x = tiles.astype(np.float32)
        # Blur inside the tile only (zero padding at its border): border pixels are less sure.
        x = uniform_filter(x, size=(1, self.blur, self.blur, 1), mode="constant", cval=0.0)
        d = ((x[..., None, :] - self._refs) ** 2).sum(-1)  # [N, t, t, K+1]
        scores = np.exp(-(d - d.min(-1, keepdims=True)) / 2000.0)
        scores /= scores.sum(-1, keepdims=True)
        return np.ascontiguousarray(scores.transpose(0, 3, 1, 2)).astype(np.float32)


def layout(width: int, height: int):
    """A render function (level-0 coordinates) and ``truth(x, y)`` -> class value
    (0 glass, 1..3 the classes): a TUM rectangle crossing chunk borders, a STR ring around a
    TUM core (a polygon with a hole), and two LYM disks."""
    def truth(xx, yy):
        xx = np.asarray(xx, np.float64)
        yy = np.asarray(yy, np.float64)
        out = np.zeros(np.broadcast(xx, yy).shape, np.uint8)
        rect = (xx >= 0.08 * width) & (xx < 0.55 * width) & (yy >= 0.10 * height) & (yy < 0.45 * height)
        out[rect] = 1
        cx, cy = 0.68 * width, 0.68 * height
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        ro, ri = 0.20 * min(width, height), 0.09 * min(width, height)
        out[(r2 < ro * ro) & (r2 >= ri * ri)] = 2
        out[r2 < ri * ri] = 1
        for dx, dy in ((0.20, 0.72), (0.35, 0.80)):
            d2 = (xx - dx * width) ** 2 + (yy - dy * height) ** 2
            out[d2 < (0.07 * min(width, height)) ** 2] = 3
        return out

    palette = np.asarray([GLASS] + [c for _, c in CLASSES], np.uint8)

    def render(x, y, w, h):
        yy, xx = np.mgrid[y : y + h, x : x + w]
        return palette[truth(xx + 0.5, yy + 0.5)]

    render.truth = truth
    return render
