"""Whole-slide segmentation: chunk grid, batched inference, blending, outputs."""

from wsiproto.segment.grid import Chunk, ChunkGrid, blend_window
from wsiproto.segment.infer import BatchRunner, TilePredictor, blend_tiles
from wsiproto.segment.pipeline import SegmentOptions, segment_slide

__all__ = [
    "BatchRunner",
    "Chunk",
    "ChunkGrid",
    "SegmentOptions",
    "TilePredictor",
    "blend_tiles",
    "blend_window",
    "segment_slide",
]
