"""Whole-slide segmentation: plan, read, infer + blend, sinks; :func:`segment_slide` runs them
(see :mod:`wsiproto.segment.engine` for the stages in order).

Names are imported on first use, so that ``wsiproto.segment.sinks`` or ``.options`` can be
read (by the command line's option parser, say) without loading the engine."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "segment_slide": "engine",
    "output_name": "folder",
    "Chunk": "grid", "ChunkGrid": "grid", "blend_window": "grid",
    "BatchRunner": "infer", "TilePredictor": "infer",
    "SegmentOptions": "options", "SegmentResult": "options",
    "SCHEMA": "plan", "config_hash": "plan",
    "runtime": "threads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
