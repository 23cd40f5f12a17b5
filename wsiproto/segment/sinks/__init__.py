"""Outputs of a segmentation run ("sinks"), chosen by name: one module each, registered here.

A sink receives every finished chunk (:class:`ChunkOutput`: its labels, and its image and
probabilities when asked for) on the engine's threads, in any order and from several threads
at once, writes what it needs under the run's ``.partial/`` folder, and turns that into its
output files at :meth:`Sink.finish`. The engine renames every sink's files into the output
folder together, once all have finished, so a half-made output never sits where a finished
one would. A sink must be resumable: when a run stops, the chunks marked done keep their part
of every sink's work, and ``has`` tells the engine whether an earlier run's part of a chunk is
still intact (else the chunk is redone).

A new output format is one module with one ``@register("name")`` class; ``--outputs`` picks
sinks by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiproto.errors import WsiprotoError

BUILTIN = {"ome-zarr": "zarr", "geojson": "geojson", "overlay": "overlay"}  # name -> module
_REGISTRY: dict[str, type] = {}


@dataclass
class ChunkOutput:
    """What the engine hands the sinks for one chunk. ``labels`` is None for a chunk without
    tissue (all 0); ``rgb`` is the chunk at the model's mpp when a sink stores the image."""

    chunk: Any  # wsiproto.segment.grid.Chunk
    labels: Any  # np.ndarray | None
    rgb: Any = None  # np.ndarray | None
    probs: Any = None  # np.ndarray | None


@dataclass
class SinkContext:
    """What a sink may know about the run."""

    plan: Any  # wsiproto.segment.plan.Plan
    opts: Any  # SegmentOptions
    partial: Path
    slide: Any  # the run's Slide (thread-safe reads)
    resuming: bool  # .partial holds an earlier run of this configuration


@dataclass
class Totals:
    """Label counts over the whole slide when every chunk is in (for summaries, legends)."""

    counts: Any  # np.ndarray [256]: label histogram
    tissue_area_mm2: float
    area_mm2: dict[str, float]
    percent_of_tissue: dict[str, float]


class Sink:
    """Base class; see the module doc."""

    name = ""

    def __init__(self, ctx: SinkContext):
        self.ctx = ctx

    @property
    def needs_image(self) -> bool:
        """Whether this sink wants every chunk's pixels (tissue or not)."""
        return False

    def has(self, chunk) -> bool:
        """An earlier run's part of ``chunk`` is intact."""
        return True

    def start(self, done: set[str]) -> None:
        """Called once before the first chunk: ``done`` are the chunks an earlier run finished
        (kept, not written again)."""

    def write(self, out: ChunkOutput) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if work the sink does in the background failed (stops the run early)."""

    def finish(self, totals: Totals) -> dict:
        """Make the output files under ``ctx.partial``; returns ``{"files": [names], ...}``
        (extra keys go into the summary's ``outputs``)."""
        raise NotImplementedError

    def abort(self) -> None:
        """The run failed: stop background work; files under ``.partial`` may stay."""


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def check_outputs(names) -> None:
    unknown = [n for n in names if n not in available()]
    if unknown or not names:
        raise WsiprotoError(f"unknown output {', '.join(unknown) or '(none)'}",
                            hint=f"choose from {', '.join(available())}")


def sink_class(name: str) -> type:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(f"{__name__}.{BUILTIN[name]}")
    check_outputs([name])
    return _REGISTRY[name]


def open_sinks(names, ctx: SinkContext) -> list[Sink]:
    """The sinks of ``names``, in a fixed order; closes (aborts) the opened ones on failure."""
    sinks: list[Sink] = []
    try:
        for name in sorted(set(names)):
            sinks.append(sink_class(name)(ctx))
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks


__all__ = ["ChunkOutput", "Sink", "SinkContext", "Totals", "available", "check_outputs",
           "open_sinks", "register"]
