"""Whole-slide images: :class:`Slide` (OpenSlide / tiffslide) and tissue detection."""

from wsiproto.slide.reader import BACKENDS, Bounds, Slide, open_slide
from wsiproto.slide.tissue import TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "BACKENDS",
    "Bounds",
    "Slide",
    "TissueMask",
    "detect_tissue",
    "open_slide",
    "tissue_mask_from_rgb",
]
