"""Whole-slide images: :class:`Slide` over the registered readers, tissue detection, regions
of interest."""

from wsiproto.slide.backends import backend_names, registered, slide_suffixes
from wsiproto.slide.reader import Bounds, Slide, open_slide
from wsiproto.slide.source import is_slide_folder
from wsiproto.slide.tissue import TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "Bounds",
    "Slide",
    "TissueMask",
    "backend_names",
    "detect_tissue",
    "is_slide_folder",
    "open_slide",
    "registered",
    "slide_suffixes",
    "tissue_mask_from_rgb",
]
