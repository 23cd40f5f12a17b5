"""Whole-slide segmentation: chunk grid, batched inference, blending, outputs."""

from wsiproto.segment.grid import Chunk, ChunkGrid, blend_window
from wsiproto.segment.infer import BatchRunner, TilePredictor, blend_tiles
from wsiproto.segment.folder import output_name
from wsiproto.segment.pipeline import (SCHEMA, SegmentOptions, SegmentResult, config_hash,
                                       segment_slide)

__all__ = [
    "BatchRunner",
    "Chunk",
    "ChunkGrid",
    "SCHEMA",
    "SegmentOptions",
    "SegmentResult",
    "TilePredictor",
    "blend_tiles",
    "blend_window",
    "config_hash",
    "output_name",
    "segment_slide",
]
