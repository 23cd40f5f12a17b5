"""The plan of one run, fixed before any tile runs: the label frame and its chunk grid, the
class table, the configuration (and its hash, which decides resume), which chunks hold
tissue and which an earlier run already finished.

The label frame is the slide's bounds-cropped frame at the model's pixel size; a label pixel
covers ``scale`` x ``scale`` level-0 pixels. Chunks tile it (``grid.chunk`` label px); tiles sit
on one global grid (see :mod:`wsiproto.segment.grid`), so every label is the same blend of the
same tiles whichever chunk computes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.segment.grid import Chunk, ChunkGrid

MAX_UPSAMPLING = 4.0
SCHEMA = 3  # bump when the outputs (or the files of an unfinished run) change

ClassTable = list[tuple[int, str, tuple[int, int, int]]]


def class_table(predictor) -> ClassTable:
    """Label values: 0 unlabelled (outside tissue), 1..K the classes, K+1 background."""
    rows = [(i + 1, name, tuple(rgb)) for i, (name, rgb) in enumerate(predictor.classes)]
    bg_name, bg_rgb = predictor.background
    rows.append((len(rows) + 1, bg_name, tuple(bg_rgb)))
    return rows


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def level0_scale(slide, model_mpp: float) -> float:
    """Level-0 px per label px; refuses more than MAX_UPSAMPLING."""
    scale = model_mpp / slide.require_mpp()
    if scale < 1.0 / MAX_UPSAMPLING:
        raise WsiprotoError(
            f"the model works at {model_mpp:g} um/px but the slide is {slide.mpp:g} um/px: "
            f"that needs {1 / scale:.1f}x upsampling (more than {MAX_UPSAMPLING:g}x)",
            path=slide.source,
            hint="use a model trained at a coarser resolution, or check the slide's mpp / --mpp",
        )
    return scale


@dataclass
class Plan:
    """Geometry and identity of a run (see module doc). ``tissue`` is set by
    :meth:`add_tissue` once the output folder is known not to be complete already."""

    name: str  # output folder name and file stem
    scale: float
    model_mpp: float
    grid: ChunkGrid
    classes: ClassTable
    config: dict
    cfg_hash: str
    tissue: Any = None  # wsiproto.slide.TissueMask
    tissue_keys: set[str] = field(default_factory=set)
    roi: Any = None  # wsiproto.slide.roi.Roi: labels only inside it

    @cached_property
    def chunks(self) -> list[Chunk]:
        """Every chunk of the grid, row by row."""
        return list(self.grid.chunks())

    @property
    def tissue_classes(self) -> ClassTable:
        """The classes exported as objects (background inside tissue is not)."""
        return self.classes[:-1]

    def add_tissue(self, tissue) -> None:
        """The tissue mask (thumbnail); restricted to the ROI when there is one (grown by a
        mask pixel there: the exact ROI edge is applied per chunk at label resolution)."""
        if self.roi is not None:
            from scipy.ndimage import binary_dilation

            h, w = tissue.mask.shape
            near = binary_dilation(self.roi.mask(0, 0, w, h, tissue.downsample), iterations=1)
            tissue.mask = tissue.mask & near
        self.tissue = tissue
        s = self.scale
        # the mask grown by a pixel: its edge is redrawn at label resolution (refine), and a
        # chunk or tile must not depend on the chunking to reach it
        self.tissue_keys = {c.key for c in self.chunks if tissue.region_has_tissue(
            c.x0 * s, c.y0 * s, c.width * s, c.height * s, grown=True)}

    def has_tissue(self, chunk: Chunk) -> bool:
        return chunk.key in self.tissue_keys

    def tissue_tiles(self, chunk: Chunk) -> list[tuple[int, int]]:
        """Label-frame positions of the global tiles of ``chunk`` that touch tissue."""
        t, s = self.grid.tile, self.scale
        if not self.has_tissue(chunk):
            return []
        return [(ty, tx) for ty, tx in self.grid.tiles_for(chunk)
                if self.tissue.region_has_tissue(tx * s, ty * s, t * s, t * s, grown=True)]

    @property
    def edge_margin(self) -> int:
        """Label px of pixels around a chunk that the tissue edge refinement needs."""
        return self.tissue.margin(self.model_mpp)

    def inside(self, chunk: Chunk, inp) -> np.ndarray:
        """Which label pixels of ``chunk`` may carry a class: tissue, its edge drawn at label
        resolution from the chunk's pixels (``inp``, a :class:`~.read.ChunkInput` holding the
        chunk and :attr:`edge_margin` px around it), and inside the ROI when there is one."""
        s = self.scale
        y, x = chunk.y0 - inp.ry0, chunk.x0 - inp.rx0
        inside = self.tissue.refine(inp.region, inp.rx0 * s, inp.ry0 * s, s, self.model_mpp,
                                    (y, x, y + chunk.height, x + chunk.width))
        if self.roi is not None:
            inside &= self.roi.mask(chunk.x0 * s, chunk.y0 * s, chunk.width, chunk.height, s)
        return inside


def make_plan(slide, predictor, opts, name: str, model_info: dict | None = None) -> Plan:
    """The plan of segmenting ``slide`` with ``predictor`` under ``opts`` into ``name``."""
    model_mpp = float(predictor.mpp)
    scale = level0_scale(slide, model_mpp)
    tile = int(predictor.tile_size)
    overlap = tile // 4 if opts.overlap is None else int(opts.overlap)
    if not 0 <= overlap < tile:
        raise WsiprotoError(f"--overlap must be between 0 and {tile - 1} px (got {overlap})")
    fw, fh = slide.size
    height, width = max(1, math.ceil(fh / scale)), max(1, math.ceil(fw / scale))
    grid = ChunkGrid(height, width, opts.chunk, tile, overlap)
    roi, options = None, {**opts.output_config(), "overlap": overlap}
    if opts.roi is not None:
        from wsiproto.files import sha256_file
        from wsiproto.slide.roi import load_roi

        roi = load_roi(opts.roi, slide.size, opts.roi_class)
        # the region's content decides, not where its file lies
        options["roi"] = {"sha256": sha256_file(opts.roi)[:16], "class": opts.roi_class}
    describe = getattr(predictor, "describe", lambda: {})
    config = {
        "schema": SCHEMA,
        "slide": slide.identity(),
        "slide_mpp": slide.mpp,
        "model": model_info or describe(),
        "options": options,
    }
    return Plan(name=name, scale=scale, model_mpp=model_mpp, grid=grid,
                classes=class_table(predictor), config=config, cfg_hash=config_hash(config),
                roi=roi)


def scan_done(partial: Path, chunks: list[Chunk]) -> dict[str, np.ndarray]:
    """Chunks an earlier run finished: key -> its label histogram (256 counts), read from the
    done markers under ``partial/done``. A marker that cannot be read does not count."""
    done: dict[str, np.ndarray] = {}
    folder = partial / "done"
    for chunk in chunks:
        marker = folder / f"{chunk.key}.npy"
        try:
            counts = np.load(marker, allow_pickle=False)
        except (OSError, ValueError):
            continue
        if counts.shape == (256,):
            done[chunk.key] = counts
    return done


def mark_done(partial: Path, chunk: Chunk, counts: np.ndarray) -> None:
    """The chunk's done marker: its label histogram, written atomically."""
    marker = partial / "done" / f"{chunk.key}.npy"
    tmp = marker.with_name(marker.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(counts, np.int64))
    os.replace(tmp, marker)


__all__ = ["MAX_UPSAMPLING", "SCHEMA", "Plan", "class_table", "config_hash", "level0_scale",
           "make_plan", "mark_done", "scan_done"]
