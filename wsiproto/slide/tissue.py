"""Tissue detection on a low-resolution thumbnail.

Method (our choice; DESIGN leaves it open): HSV saturation thresholded by Otsu (clamped to a
sane range so that an all-tissue or an all-glass thumbnail is not split in two), minus glass
(very bright), minus dark debris / black ink, minus pen marks (H&E is pink to purple, so the
green channel is the smallest; green and blue ink break that, red ink is red with as little
blue as green), then morphology in physical units: open away speckles, close small gaps, fill
small holes and drop fragments smaller than ``min_object_um2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Saturation thresholds (0..1) between which Otsu's choice is kept.
_SAT_RANGE = (0.07, 0.20)


@dataclass
class TissueMask:
    """A boolean tissue mask over the bounds-cropped frame.

    ``downsample``: level-0 pixels per mask pixel; ``mpp``: the mask's pixel size in um when
    the slide's is known.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self, slide_mpp: float) -> float:
        return float(self.mask.sum()) * (self.downsample * slide_mpp) ** 2

    def region_has_tissue(self, x: float, y: float, width: float, height: float) -> bool:
        """Whether any mask pixel touches the level-0 rectangle (x, y, width, height)."""
        d = self.downsample
        h, w = self.mask.shape
        x0, y0 = max(int(np.floor(x / d)), 0), max(int(np.floor(y / d)), 0)
        x1, y1 = min(int(np.ceil((x + width) / d)), w), min(int(np.ceil((y + height) / d)), h)
        return bool(x1 > x0 and y1 > y0 and self.mask[y0:y1, x0:x1].any())


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (between-class variance maximised on a histogram)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r + r


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or red marker ink (or black ink) on an RGB uint8 image."""
    a = rgb.astype(np.int16)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = a.max(-1), a.min(-1)
    chroma = mx - mn
    green = (g > r + 10) & (g >= b - 10) & (chroma > 25)
    blue = (b > r + 30) & (b > g + 15) & (g > r + 10) & (chroma > 40)
    red = (r > b + 60) & (b - g < 25) & (r > 120)
    black = mx < 50
    return green | blue | red | black


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    mpp: float | None = None,
    *,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 20_000.0,
    exclude_pen: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (a slide thumbnail) with pixel size ``mpp``.

    Without ``mpp`` the morphology sizes assume a thumbnail of about 8 um/px.
    """
    from scipy import ndimage as ndi

    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    a = rgb.astype(np.float32)
    mx, mn = a.max(-1), a.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    thr = float(np.clip(otsu_threshold(sat.ravel()), *_SAT_RANGE))
    tissue = (sat > thr) & (mn < 235)  # glass: saturation low or every channel bright
    if exclude_pen:
        tissue &= ~pen_mask(rgb)

    px_um = 8.0 if mpp is None else float(mpp)
    px_area = px_um * px_um
    # Remove speckles and close gaps of about 16 um, never below one pixel.
    radius = max(1, int(round(8.0 / px_um)))
    tissue = ndi.binary_opening(tissue, structure=_disk(1))
    tissue = ndi.binary_closing(tissue, structure=_disk(radius), border_value=0)
    # Fill holes smaller than max_hole_um2 (lumina, cracks), keep large ones (real glass).
    holes = ndi.binary_fill_holes(tissue) & ~tissue
    if holes.any():
        lab, n = ndi.label(holes)
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
        small = sizes <= max_hole_um2
        small[0] = False
        tissue |= small[lab]
    lab, n = ndi.label(tissue)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_object_um2
        keep[0] = False
        tissue = keep[lab]
    return tissue


def detect_tissue(
    slide,
    *,
    mpp: float = 8.0,
    max_size: int = 2048,
    min_object_um2: float = 5_000.0,
    exclude_pen: bool = True,
) -> TissueMask:
    """Tissue mask of ``slide`` from a thumbnail at ``mpp`` um/px (or ``max_size`` px long
    side when the slide's pixel size is unknown)."""
    if slide.mpp is not None:
        fw, fh = slide.size
        # Never larger than max_size on the long side, whatever the slide's size.
        target = max(mpp, max(fw, fh) * slide.mpp / max_size)
        thumb, ds = slide.thumbnail(mpp=target)
        thumb_mpp = ds * slide.mpp
    else:
        thumb, ds = slide.thumbnail(max_size=max_size)
        thumb_mpp = None
    mask = tissue_mask_from_rgb(
        thumb, thumb_mpp, min_object_um2=min_object_um2, exclude_pen=exclude_pen
    )
    return TissueMask(mask=mask, downsample=ds, mpp=thumb_mpp)
