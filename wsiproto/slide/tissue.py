"""Tissue detection on a low-resolution thumbnail, and its edges refined at full resolution.

Method (our choice; DESIGN leaves it open), on a thumbnail of about 8 um/px:

* a pixel is a tissue *candidate* when its HSV saturation exceeds a low threshold (half of
  Otsu's threshold, clamped to 0.07-0.20 so that an all-tissue or all-glass thumbnail is not
  split in two; but never within the glass's own noise: above the mean + 3 standard
  deviations of the pixels below Otsu's) and it is not glass (every channel >= 235), dark
  debris or black ink, or green / blue / red marker ink (H&E is pink to purple: the green
  channel is the smallest);
* tissue is every connected group of candidates that holds at least one pixel above the full
  threshold (hysteresis, as in Canny's edge linking): a thin strand of tissue, whose colour a
  thumbnail pixel dilutes with the glass beside it, survives as long as it is attached to
  tissue or strongly coloured somewhere, while faint glass noise is never a seed;
* small gaps are closed (about 16 um), small holes filled (lumina, cracks; up to
  ``max_hole_um2``), and groups smaller than ``min_object_um2`` dropped: that rule, not an
  erosion, removes dust and specks, so tissue thinner than a thumbnail pixel is kept.

:meth:`TissueMask.refine` then draws the edge at full resolution where the thumbnail is
uncertain: within one thumbnail pixel of its mask's border, the same candidate rule (the low
threshold; glass and ink excluded) is applied to the pixels the segmentation reads anyway,
with gaps of about 16 um closed; deeper inside, the thumbnail's mask stands (its holes stay
filled) and farther out nothing is tissue (dust stays dropped). The refinement only looks a
bounded distance around each pixel (:meth:`TissueMask.margin`), so chunks of any size give
the same edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Saturation thresholds (0..1) between which Otsu's choice is kept.
_SAT_RANGE = (0.07, 0.20)
REFINE_BLOCK = 256  # TissueMask.refine works block by block where the edge band is


@dataclass
class TissueMask:
    """A boolean tissue mask over the bounds-cropped frame.

    ``downsample``: level-0 pixels per mask pixel; ``mpp``: the mask's pixel size in um when
    the slide's is known; ``threshold``: the low saturation threshold of the mask's candidates,
    which :meth:`refine` applies at full resolution.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None = None
    threshold: float = _SAT_RANGE[0] / 2
    exclude_pen: bool = True

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_um2(self, slide_mpp: float) -> float:
        return float(self.mask.sum()) * (self.downsample * slide_mpp) ** 2

    def region_has_tissue(self, x: float, y: float, width: float, height: float,
                          grown: bool = False) -> bool:
        """Whether any mask pixel touches the level-0 rectangle (x, y, width, height);
        ``grown``: any pixel of the mask grown by one pixel, where :meth:`refine` may still
        find tissue."""
        mask = self.zones()[1] if grown else self.mask
        d = self.downsample
        h, w = mask.shape
        x0, y0 = max(int(np.floor(x / d)), 0), max(int(np.floor(y / d)), 0)
        x1, y1 = min(int(np.ceil((x + width) / d)), w), min(int(np.ceil((y + height) / d)), h)
        return bool(x1 > x0 and y1 > y0 and mask[y0:y1, x0:x1].any())

    def lookup(self, mask: np.ndarray, x0: float, y0: float, width: int, height: int,
               scale: float) -> np.ndarray:
        """``mask`` (this mask's grid) at the centres of a grid of ``scale`` level-0 px per
        pixel whose top-left is level-0 (x0, y0): bool [height, width], nearest neighbour.
        The mask's pixels cover many grid pixels: gather the distinct rows and columns, then
        repeat them."""
        d = self.downsample
        ys = (y0 + (np.arange(height) + 0.5) * scale) / d
        xs = (x0 + (np.arange(width) + 0.5) * scale) / d
        ys = np.clip(ys.astype(np.int64), 0, mask.shape[0] - 1)
        xs = np.clip(xs.astype(np.int64), 0, mask.shape[1] - 1)
        uy, ny = np.unique(ys, return_counts=True)  # ys, xs are non-decreasing
        ux, nx = np.unique(xs, return_counts=True)
        return np.repeat(np.repeat(mask[uy][:, ux], ny, axis=0), nx, axis=1)

    def zones(self) -> tuple[np.ndarray, np.ndarray]:
        """(core, near) on this mask's grid: tissue one pixel in from the border, and the mask
        grown by one pixel. Between the two lies the band :meth:`refine` redraws."""
        from scipy import ndimage as ndi

        if getattr(self, "_zones", None) is None:
            square = np.ones((3, 3), bool)
            core = ndi.binary_erosion(self.mask, square, border_value=1)
            near = ndi.binary_dilation(self.mask, square)
            self._zones = (core, near)
        return self._zones

    @staticmethod
    def margin(px_um: float) -> int:
        """Pixels of context :meth:`refine` needs around an area at ``px_um`` um/px."""
        return 2 * _close_radius(px_um) + 2

    def refine(self, rgb: np.ndarray, x0: float, y0: float, scale: float, px_um: float,
               crop: tuple[int, int, int, int]) -> np.ndarray:
        """Tissue at full resolution over ``crop`` (y0, x0, y1, x1 in ``rgb``'s pixels) of
        ``rgb``, an image whose top-left pixel covers level-0 (x0, y0), ``scale`` level-0 px
        per pixel (``px_um`` um each); ``rgb`` holds :meth:`margin` pixels of context around
        the crop. See the module doc."""
        cy0, cx0, cy1, cx1 = crop
        core, near = self.zones()
        h, w = cy1 - cy0, cx1 - cx0
        ox, oy = x0 + cx0 * scale, y0 + cy0 * scale
        out = self.lookup(core, ox, oy, w, h, scale)
        band = self.lookup(near, ox, oy, w, h, scale) & ~out
        m, step = self.margin(px_um), REFINE_BLOCK
        # block by block, only where the band is: the band is thin, the chunk large
        for by in range(0, h, step):
            for bx in range(0, w, step):
                b = band[by : by + step, bx : bx + step]
                if not b.any():
                    continue
                y, x = cy0 + by, cx0 + bx
                pix = rgb[max(y - m, 0) : y + step + m, max(x - m, 0) : x + step + m]
                fine = _fine_tissue(pix, self.threshold, px_um, self.exclude_pen)
                fy, fx = y - max(y - m, 0), x - max(x - m, 0)
                b &= fine[fy : fy + b.shape[0], fx : fx + b.shape[1]]
                out[by : by + step, bx : bx + step] |= b
        return out


def _close_radius(px_um: float) -> int:
    """Half-width of the square that closes gaps of about 16 um at ``px_um`` um/px."""
    return max(1, int(round(8.0 / px_um)))


def _fine_tissue(rgb: np.ndarray, low: float, px_um: float, exclude_pen: bool) -> np.ndarray:
    """The candidate rule at full resolution, gaps of about 16 um closed and isolated pixels
    dropped, with square filters (separable: fast on large images); bounded context."""
    from scipy import ndimage as ndi

    planes = _planes(rgb)
    mx, mn = planes[3], planes[4]
    cand = ((mx - mn) > low * np.maximum(mx, 1)) & (mn < 235)
    if exclude_pen:
        cand &= ~pen_mask(rgb, planes)
    x = cand.view(np.uint8)
    size = 2 * _close_radius(px_um) + 1
    x = ndi.minimum_filter(ndi.maximum_filter(x, size), size)  # closing
    x = ndi.maximum_filter(ndi.minimum_filter(x, 3), 3)  # opening: lone pixels out
    return x.astype(bool)


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


def _planes(rgb: np.ndarray):
    """(r, g, b) as int16 planes and their max and min: channel by channel, which numpy does
    several times faster than a reduction over the last axis of length 3."""
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    return r, g, b, np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def pen_mask(rgb: np.ndarray, planes=None) -> np.ndarray:
    """Pixels of green, blue or red marker ink (or black ink) on an RGB uint8 image."""
    r, g, b, mx, mn = planes if planes is not None else _planes(rgb)
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
    return _mask_and_threshold(rgb, mpp, min_object_um2, max_hole_um2, exclude_pen)[0]


def _mask_and_threshold(rgb, mpp, min_object_um2, max_hole_um2, exclude_pen):
    from scipy import ndimage as ndi

    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool), _SAT_RANGE[0] / 2
    a = rgb.astype(np.float32)
    mx, mn = a.max(-1), a.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    thr = float(np.clip(otsu_threshold(sat.ravel()), *_SAT_RANGE))
    low = _low_threshold(sat, thr)
    candidate = (sat > low) & (mn < 235)  # glass: saturation low or every channel bright
    if exclude_pen:
        candidate &= ~pen_mask(rgb)
    # Hysteresis: groups of candidates holding a pixel above the full threshold.
    lab, n = ndi.label(candidate, structure=np.ones((3, 3), bool))
    seeded = np.zeros(n + 1, bool)
    seeded[np.unique(lab[candidate & (sat > thr)])] = True
    seeded[0] = False
    tissue = seeded[lab]

    px_um = 8.0 if mpp is None else float(mpp)
    px_area = px_um * px_um
    radius = max(1, int(round(8.0 / px_um)))  # close gaps of about 16 um
    tissue = ndi.binary_closing(tissue, structure=_disk(radius), border_value=0)
    # Fill holes smaller than max_hole_um2 (lumina, cracks), keep large ones (real glass).
    holes = ndi.binary_fill_holes(tissue) & ~tissue
    if holes.any():
        lab, n = ndi.label(holes)
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
        small = sizes <= max_hole_um2
        small[0] = False
        tissue |= small[lab]
    # Dust and specks: groups smaller than min_object_um2 (thin tissue is not eroded away).
    lab, n = ndi.label(tissue, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_object_um2
        keep[0] = False
        tissue = keep[lab]
    return tissue, low


def _low_threshold(sat: np.ndarray, thr: float) -> float:
    """The hysteresis' low threshold: half of ``thr``, but above the glass's own noise (mean
    + 3 standard deviations of the pixels below ``thr``), so that candidates never
    percolate through glass."""
    glass = sat[sat < thr]
    if glass.size < 16:
        return thr / 2
    return float(min(thr, max(thr / 2, glass.mean() + 3 * glass.std())))


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
    mask, low = _mask_and_threshold(thumb, thumb_mpp, min_object_um2, 20_000.0, exclude_pen)
    return TissueMask(mask=mask, downsample=ds, mpp=thumb_mpp, threshold=low,
                      exclude_pen=exclude_pen)
