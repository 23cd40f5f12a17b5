"""What a segmentation run is asked to do (:class:`SegmentOptions`) and what it did
(:class:`SegmentResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wsiproto.errors import WsiprotoError

DEFAULT_OUTPUTS = ("ome-zarr", "geojson", "overlay")


@dataclass
class SegmentOptions:
    """What a run writes and how; everything that changes outputs goes into the config hash
    (:meth:`output_config`)."""

    out: Path = Path("wsiproto-out")
    batch_size: int = 32  # tiles per model call (the model always sees exactly this many)
    overlap: int | None = None  # label px shared by neighbouring tiles; default tile // 4
    chunk: int = 2048  # label px per chunk side (a multiple of zarr_chunk)
    zarr_chunk: int = 512
    mpp: float | None = None  # the slide's level-0 pixel size, overriding its own
    backend: str = "auto"
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS  # sinks by name (wsiproto.segment.sinks)
    ngff_version: str = "0.5"
    objects: str = "annotation"
    gzip: bool = False
    probabilities: bool = False
    image: bool = True  # write the RGB image the labels annotate into the zarr
    roi: str | None = None  # a QuPath GeoJSON of regions: segment only inside them
    roi_class: str | None = None  # only the ROI features of this classification
    overwrite: bool = False
    quiet: bool = False
    # chunks in inference at once; None: from the device and the cores (engine.default_workers)
    workers: int | None = None
    fail_after_chunks: int | None = field(default=None, repr=False)  # tests: simulate a crash

    def check(self) -> None:
        """One-line errors for values no run can use."""
        for name in ("batch_size", "chunk", "zarr_chunk"):
            if int(getattr(self, name)) < 1:
                raise WsiprotoError(f"{name.replace('_', ' ')} must be at least 1 "
                                    f"(got {getattr(self, name)})")
        if self.chunk % self.zarr_chunk:
            raise WsiprotoError(f"--chunk-size must be a positive multiple of {self.zarr_chunk} "
                                f"(got {self.chunk})", hint="e.g. --chunk-size 2048")
        if self.workers is not None and int(self.workers) < 1:
            raise WsiprotoError(f"--workers must be at least 1 (got {self.workers})")
        from wsiproto.segment.sinks import check_outputs

        check_outputs(self.outputs)

    def output_config(self) -> dict:
        keys = ("overlap", "chunk", "zarr_chunk", "mpp", "ngff_version", "objects", "gzip",
                "probabilities", "image", "roi")  # roi: replaced by its content (plan.py)
        return {**{k: getattr(self, k) for k in keys}, "outputs": sorted(self.outputs)}


@dataclass
class SegmentResult:
    """What :func:`~wsiproto.segment.segment_slide` did: the summary (as written to
    ``summary.json``), where, and how the run went. ``already_complete``: the folder held this
    configuration's finished results and nothing ran; ``chunks_resumed``: chunks an
    interrupted earlier run had finished (not run again)."""

    summary: dict
    folder: Path
    already_complete: bool = False
    chunks_resumed: int = 0
    chunks_run: int = 0
    tiles_run: int = 0

    @property
    def resumed(self) -> bool:
        return self.chunks_resumed > 0

    @property
    def timings(self) -> dict:
        return self.summary.get("timings", {})


class SimulatedCrash(RuntimeError):
    """Raised by ``fail_after_chunks`` (tests of resume)."""


__all__ = ["DEFAULT_OUTPUTS", "SegmentOptions", "SegmentResult", "SimulatedCrash"]
