"""wsiproto: DualProtoSeg weakly supervised tissue segmentation for whole-slide images.

Heavy dependencies (torch, open_clip, openslide, dask) are imported inside the functions that
need them, so that ``import wsiproto`` and ``wsiproto --help`` stay fast and workers can spawn
without paying for them.
"""

from wsiproto.errors import WsiprotoError

__version__ = "0.1.0"

__all__ = ["WsiprotoError", "__version__"]
