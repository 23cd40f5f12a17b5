"""``segment_slide``: one slide in, OME-Zarr label pyramid + GeoJSON + summary + overlay out.

Flow: slide -> tissue mask (thumbnail) -> chunk grid at the model's mpp, restricted to tissue ->
a dask graph with one task per chunk (read chunk + margin, cut tiles on the global tile grid,
batch them through the shared :class:`BatchRunner`, blend by summed weights, argmax, write the
chunk's labels into the level-0 zarr array, mark it done) -> pyramid levels -> GeoJSON and class
areas, chunk by chunk from the zarr -> overlay and summary.

Memory is bounded by chunk size x chunks in flight (``workers``), never by the slide: no
full-resolution array of the slide or of its labels exists at any point.

Files under ``OUT/<stem>/``: ``<stem>.ome.zarr``, ``<stem>.geojson[.gz]``, ``overlay.png`` and
``summary.json``. ``summary.json`` is written last: its presence with the same config hash means
the run is complete. Work in progress lives in ``OUT/<stem>/.partial/`` (the zarr store being
written, ``config.json``, one marker file per finished chunk); a rerun with the same config
resumes there and redoes only chunks without a marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.segment.grid import Chunk, ChunkGrid
from wsiproto.segment.infer import BatchRunner, TilePredictor, blend_tiles

log = logging.getLogger(__name__)

MAX_UPSAMPLING = 4.0
SCHEMA = 1  # bump when the outputs of the same options change


@dataclass
class SegmentOptions:
    """What a run writes and how; everything that changes outputs goes into the config hash."""

    out: Path = Path("wsiproto-out")
    batch_size: int = 32
    overlap: int | None = None  # label px shared by neighbouring tiles; default tile // 4
    chunk: int = 2048  # label px per chunk side (a multiple of zarr_chunk)
    zarr_chunk: int = 512
    mpp: float | None = None  # slide pixel size when the slide has none
    backend: str = "auto"
    ngff_version: str = "0.5"
    objects: str = "annotation"
    gzip: bool = False
    probabilities: bool = False
    image: bool = True  # write the RGB image the labels annotate into the zarr
    overwrite: bool = False
    quiet: bool = False
    workers: int = 2  # chunk tasks in flight (threads reading, cutting and blending)
    fail_after_chunks: int | None = field(default=None, repr=False)  # tests: simulate a crash

    def output_config(self) -> dict:
        keys = ("overlap", "chunk", "zarr_chunk", "mpp", "ngff_version", "objects", "gzip",
                "probabilities", "image")
        return {k: getattr(self, k) for k in keys}


class SimulatedCrash(RuntimeError):
    """Raised by ``fail_after_chunks`` (tests of resume)."""


def _class_table(predictor: TilePredictor) -> list[tuple[int, str, tuple[int, int, int]]]:
    """Label values: 0 unlabelled (outside tissue), 1..K the classes, K+1 background."""
    rows = [(i + 1, name, tuple(rgb)) for i, (name, rgb) in enumerate(predictor.classes)]
    bg_name, bg_rgb = predictor.background
    rows.append((len(rows) + 1, bg_name, tuple(bg_rgb)))
    return rows


def slide_stem(path: str | os.PathLike) -> str:
    """The name of a slide's output folder: its file name without the extension
    (``a.svs`` -> ``a``, ``b.v2.ndpi`` -> ``b.v2``, ``c.ome.tiff`` -> ``c``)."""
    name = Path(path).name
    for double in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(double) and len(name) > len(double):
            return name[: -len(double)]
    return Path(name).stem or name


def _slide_identity(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WsiprotoError(
            f"output folder is not writable ({exc.strerror or exc})", path=folder,
            hint="choose another --out or fix its permissions",
        ) from exc


class _Progress:
    """A tqdm bar over chunks with tiles/s, thread-safe; silent with ``quiet``."""

    def __init__(self, total: int, quiet: bool, desc: str):
        self._lock = threading.Lock()
        self.tiles = 0
        self._t0 = time.perf_counter()
        self._bar = None
        if not quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="chunk", leave=True, dynamic_ncols=True)

    def update(self, tiles: int) -> None:
        with self._lock:
            self.tiles += tiles
            if self._bar is not None:
                rate = self.tiles / max(time.perf_counter() - self._t0, 1e-9)
                self._bar.set_postfix_str(f"{rate:.1f} tiles/s", refresh=False)
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _SlidePool:
    """One Slide handle per thread, so chunk tasks decode in parallel."""

    def __init__(self, path: Path, backend: str, mpp: float | None):
        self._args = (path, backend, mpp)
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def get(self):
        slide = getattr(self._local, "slide", None)
        if slide is None:
            from wsiproto.slide import Slide

            path, backend, mpp = self._args
            slide = Slide(path, backend=backend, mpp=mpp)
            self._local.slide = slide
            with self._lock:
                self._all.append(slide)
        return slide

    def close(self) -> None:
        for s in self._all:
            s.close()


@dataclass
class _Run:
    """Everything a chunk task needs (shared, read-only during the run)."""

    grid: ChunkGrid
    scale: float  # level-0 px per label px
    model_mpp: float
    tissue: Any
    pool: _SlidePool
    runner: BatchRunner
    writer: Any
    done_dir: Path
    probabilities: bool
    image: bool
    num_values: int  # label values: 0, the classes, background
    group: int  # tiles per model request from one chunk


def _tissue_pixels(run: _Run, chunk: Chunk) -> np.ndarray:
    """Nearest-neighbour lookup of the tissue mask at the chunk's label-pixel centres."""
    m, d = run.tissue.mask, run.tissue.downsample
    ys = ((np.arange(chunk.y0, chunk.y0 + chunk.height) + 0.5) * run.scale / d).astype(np.int64)
    xs = ((np.arange(chunk.x0, chunk.x0 + chunk.width) + 0.5) * run.scale / d).astype(np.int64)
    ys = np.clip(ys, 0, m.shape[0] - 1)
    xs = np.clip(xs, 0, m.shape[1] - 1)
    return m[np.ix_(ys, xs)]


def process_chunk(run: _Run, chunk: Chunk) -> int:
    """Segment one chunk and write it; returns the number of tiles run."""
    grid, t, s = run.grid, run.grid.tile, run.scale
    positions = [
        (ty, tx) for ty, tx in grid.tiles_for(chunk)
        if run.tissue.region_has_tissue(tx * s, ty * s, t * s, t * s)
    ]
    labels = np.zeros((chunk.height, chunk.width), np.uint8)
    rgb = None
    if positions:
        ry0 = min(p[0] for p in positions)
        rx0 = min(p[1] for p in positions)
        ry1 = max(p[0] for p in positions) + t
        rx1 = max(p[1] for p in positions) + t
        slide = run.pool.get()
        region = slide.read_region((rx0 * s, ry0 * s), (rx1 - rx0, ry1 - ry0), mpp=run.model_mpp)
        k1 = run.num_values - 1  # classes + background
        acc = np.zeros((k1, chunk.height, chunk.width), np.float32)
        wsum = np.zeros((chunk.height, chunk.width), np.float32)
        # Tiles go to the model and into the blend group by group: the scores of a whole chunk
        # (about 1 MB per tile) never exist at once.
        for g in range(0, len(positions), run.group):
            group = positions[g : g + run.group]
            tiles = np.stack([region[ty - ry0 : ty - ry0 + t, tx - rx0 : tx - rx0 + t]
                              for ty, tx in group])
            blend_tiles(run.runner.run(tiles), group, (chunk.y0, chunk.x0),
                        (chunk.height, chunk.width), grid.overlap, out=(acc, wsum))
        covered = wsum > 0
        inside = _tissue_pixels(run, chunk) & covered
        labels[inside] = (np.argmax(acc[:, inside], axis=0) + 1).astype(np.uint8)
        if run.probabilities:
            probs = acc / np.maximum(wsum, 1e-12)
            probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
            probs = np.where(inside, probs, 0.0)
            run.writer.write_probabilities(chunk.y0, chunk.x0,
                                           (probs * 255).round().astype(np.uint8))
        if run.image:
            oy, ox = chunk.y0 - ry0, chunk.x0 - rx0
            rgb = region[max(oy, 0) : oy + chunk.height, max(ox, 0) : ox + chunk.width]
            if rgb.shape[:2] != (chunk.height, chunk.width):  # tiles did not cover it all
                full = np.full((chunk.height, chunk.width, 3), 255, np.uint8)
                full[max(-oy, 0) : max(-oy, 0) + rgb.shape[0],
                     max(-ox, 0) : max(-ox, 0) + rgb.shape[1]] = rgb
                rgb = full
    if run.image and rgb is None:
        slide = run.pool.get()
        rgb = slide.read_region((chunk.x0 * s, chunk.y0 * s), (chunk.width, chunk.height),
                                mpp=run.model_mpp)
    if rgb is not None:
        run.writer.write_image(chunk.y0, chunk.x0, rgb)
    run.writer.write_labels(chunk.y0, chunk.x0, labels)
    (run.done_dir / chunk.key).touch()
    return len(positions)


def _prepare_output(folder: Path, stem: str, cfg_hash: str, overwrite: bool) -> tuple[bool, Path]:
    """(already complete?, partial dir). Refuses to touch results of another config."""
    summary = folder / "summary.json"
    partial = folder / ".partial"
    if summary.exists():
        try:
            old = json.loads(summary.read_text()).get("config_hash")
        except (OSError, ValueError):
            old = None
        if old == cfg_hash and not overwrite:
            return True, partial
        if old != cfg_hash and not overwrite:
            raise WsiprotoError(
                "holds results of a different configuration", path=folder,
                hint="pass --overwrite to replace them, or choose another --out",
            )
    if partial.exists():
        try:
            old = json.loads((partial / "config.json").read_text()).get("config_hash")
        except (OSError, ValueError):
            old = None
        if old != cfg_hash and not overwrite:
            raise WsiprotoError(
                "holds an unfinished run with a different configuration", path=folder,
                hint="rerun with the same options to resume it, or pass --overwrite",
            )
    if overwrite:
        for name in (".partial", "summary.json", "overlay.png", f"{stem}.ome.zarr",
                     f"{stem}.geojson", f"{stem}.geojson.gz"):
            p = folder / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return False, partial


def segment_slide(
    slide_path: str | os.PathLike,
    predictor: TilePredictor,
    options: SegmentOptions | None = None,
    *,
    model_info: dict | None = None,
    runner: BatchRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Segment one slide; returns the summary (also written to ``summary.json``).

    ``runner``: a shared :class:`BatchRunner` (cohorts reuse one per worker); by default one is
    made for this slide and closed at the end.
    """
    from wsiproto.slide import Slide, detect_tissue

    opts = options or SegmentOptions()
    echo = echo or (lambda msg: None)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    slide = Slide(slide_path, backend=opts.backend, mpp=opts.mpp)
    try:
        slide_mpp = slide.require_mpp()
        model_mpp = float(predictor.mpp)
        scale = model_mpp / slide_mpp
        if scale < 1.0 / MAX_UPSAMPLING:
            raise WsiprotoError(
                f"the model works at {model_mpp:g} um/px but the slide is {slide_mpp:g} um/px: "
                f"that needs {1 / scale:.1f}x upsampling (more than {MAX_UPSAMPLING:g}x)",
                path=slide.path,
                hint="use a model trained at a coarser resolution, or check the slide's mpp / --mpp",
            )
        tile = int(predictor.tile_size)
        overlap = tile // 4 if opts.overlap is None else int(opts.overlap)
        if not 0 <= overlap < tile:
            raise WsiprotoError(f"--overlap must be between 0 and {tile - 1} px (got {overlap})")
        if opts.chunk % opts.zarr_chunk:
            raise WsiprotoError(
                f"chunk size {opts.chunk} is not a multiple of the zarr chunk {opts.zarr_chunk}"
            )
        fw, fh = slide.size
        height, width = max(1, math.ceil(fh / scale)), max(1, math.ceil(fw / scale))
        grid = ChunkGrid(height, width, opts.chunk, tile, overlap)
        stem = slide_stem(slide.path)
        folder = Path(opts.out) / stem
        _ensure_writable(folder)
        classes = _class_table(predictor)
        config = {
            "schema": SCHEMA,
            "slide": _slide_identity(slide.path),
            "slide_mpp": slide_mpp,
            "model": model_info or getattr(predictor, "describe", lambda: {})(),
            "options": {**opts.output_config(), "overlap": overlap},
        }
        cfg_hash = config_hash(config)
        complete, partial = _prepare_output(folder, stem, cfg_hash, opts.overwrite)
        if complete:
            echo(f"{folder}: already complete for this configuration (hash {cfg_hash}); "
                 "nothing to do (--overwrite to redo)")
            return json.loads((folder / "summary.json").read_text())

        t0 = time.perf_counter()
        tissue = detect_tissue(slide)
        timings["tissue_s"] = time.perf_counter() - t0

        summary = _run_chunks_and_export(
            slide, predictor, opts, grid, scale, model_mpp, tissue, folder, partial, stem,
            classes, config, cfg_hash, timings, runner, echo,
        )
    finally:
        slide.close()
    summary["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    from wsiproto.files import write_json_atomic

    write_json_atomic(folder / "summary.json", summary)
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _open_writer(partial: Path, stem: str, grid: ChunkGrid, model_mpp: float, classes, opts,
                 cfg_hash: str, config: dict):
    from wsiproto.export.ngff import SlidePyramidWriter

    zpath = partial / f"{stem}.ome.zarr"
    cfg_file = partial / "config.json"
    if zpath.exists() and cfg_file.exists():
        return SlidePyramidWriter.open(zpath)
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "done").mkdir(parents=True)
    writer = SlidePyramidWriter(
        zpath, height=grid.height, width=grid.width, mpp=model_mpp, classes=classes,
        ngff_version=opts.ngff_version, chunk=opts.zarr_chunk,
        probabilities=opts.probabilities, image=opts.image, name=stem,
    )
    from wsiproto.files import write_json_atomic

    write_json_atomic(cfg_file, {"config_hash": cfg_hash, "config": config})
    return writer


def _run_chunks_and_export(slide, predictor, opts, grid, scale, model_mpp, tissue, folder,
                           partial, stem, classes, config, cfg_hash, timings, runner, echo):
    import dask

    writer = _open_writer(partial, stem, grid, model_mpp, classes, opts, cfg_hash, config)
    done_dir = partial / "done"
    all_chunks = list(grid.chunks())
    with_tissue = [c for c in all_chunks
                   if tissue.region_has_tissue(c.x0 * scale, c.y0 * scale,
                                               c.width * scale, c.height * scale)]
    done = {p.name for p in done_dir.iterdir()}
    todo = [c for c in with_tissue if c.key not in done]
    if not with_tissue:
        log.warning("%s: no tissue found; writing empty outputs", slide.path)
        echo(f"warning: {slide.path}: no tissue detected; the outputs are valid but empty")
    elif len(todo) < len(with_tissue):
        echo(f"resuming: {len(with_tissue) - len(todo)} of {len(with_tissue)} chunks already done")

    own_runner = runner is None
    runner = runner or BatchRunner(predictor, batch_size=opts.batch_size)
    pool = _SlidePool(slide.path, slide.backend, opts.mpp)
    run = _Run(grid, scale, model_mpp, tissue, pool, runner, writer, done_dir,
               opts.probabilities, opts.image, len(classes) + 1,
               group=max(opts.batch_size, 16))
    progress = _Progress(len(todo), opts.quiet, desc=stem)
    counter = {"chunks": 0}
    lock = threading.Lock()

    def task(chunk: Chunk) -> int:
        if opts.fail_after_chunks is not None:
            with lock:
                if counter["chunks"] >= opts.fail_after_chunks:
                    raise SimulatedCrash(f"simulated crash before chunk {chunk.key}")
                counter["chunks"] += 1
        n = process_chunk(run, chunk)
        progress.update(n)
        return n

    busy_before = runner.busy_s
    t0 = time.perf_counter()
    try:
        tasks = [dask.delayed(task, pure=False)(c, dask_key_name=f"chunk-{c.key}") for c in todo]
        tile_counts = dask.compute(*tasks, scheduler="threads",
                                   num_workers=max(1, opts.workers)) if tasks else ()
    finally:
        progress.close()
        pool.close()
        if own_runner:
            runner.close()
    timings["inference_s"] = time.perf_counter() - t0
    model_busy = runner.busy_s - busy_before

    t0 = time.perf_counter()
    writer.build_pyramid(num_workers=max(1, opts.workers))
    writer.finalize()
    timings["pyramid_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts, geo = _export_geojson(writer, folder, stem, grid, scale, classes, opts, slide.mpp)
    timings["geojson_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    percent = _areas(counts, classes, model_mpp)
    _write_overlay(slide, writer, folder, classes, percent["percent_of_tissue"], stem)
    timings["overlay_s"] = time.perf_counter() - t0

    final_zarr = folder / f"{stem}.ome.zarr"
    if final_zarr.exists():
        shutil.rmtree(final_zarr)
    os.replace(partial / f"{stem}.ome.zarr", final_zarr)

    return {
        "slide": {
            "path": str(slide.path), "backend": slide.backend, "vendor": slide.vendor,
            "width": slide.size[0], "height": slide.size[1], "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
        },
        "model": config["model"],
        "config_hash": cfg_hash,
        "config": config["options"],
        "label_frame": {"height": grid.height, "width": grid.width, "mpp": model_mpp,
                        "level0_px_per_label_px": scale},
        "labels": [{"value": 0, "name": "unlabelled (no tissue)"}]
        + [{"value": v, "name": n, "color": list(c)} for v, n, c in classes],
        "tissue_area_mm2": percent["tissue_area_mm2"],
        "tissue_mask_area_mm2": round(tissue.area_um2(slide.mpp) / 1e6, 6),
        "class_area_mm2": percent["area_mm2"],
        "class_percent_of_tissue": percent["percent_of_tissue"],
        "chunks": {"total": len(all_chunks), "with_tissue": len(with_tissue),
                   "run_now": len(todo)},
        "tiles": {"run_now": int(sum(tile_counts)), "global_grid": grid.total_tiles(),
                  "model_busy_s": round(model_busy, 3)},
        "outputs": {
            "folder": str(folder), "ome_zarr": final_zarr.name, "geojson": geo["path"].name,
            "overlay": "overlay.png", "features": geo["features"],
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _export_geojson(writer, folder, stem, grid, scale, classes, opts, slide_mpp):
    from wsiproto.export.geojson import GeoJSONWriter

    path = folder / (f"{stem}.geojson.gz" if opts.gzip else f"{stem}.geojson")
    tissue_classes = classes[:-1]  # background inside tissue is not exported as objects
    gj = GeoJSONWriter(
        path, classes=tissue_classes, scale=scale, object_type=opts.objects, gzip=opts.gzip,
        mpp=slide_mpp, chunk_shape=(opts.zarr_chunk, opts.zarr_chunk),
        label_shape=(grid.height, grid.width),
    )
    counts = np.zeros(256, np.int64)
    try:
        for y0, x0, block in writer.iter_label_chunks(0):
            counts += np.bincount(block.ravel(), minlength=256)
            if block.any():
                gj.add_chunk(y0, x0, block)
    except BaseException:
        abort = getattr(gj, "abort", None)
        if abort is not None:
            abort()
        raise
    stats = gj.close()
    features = stats.get("features", stats) if isinstance(stats, dict) else stats
    return counts, {"path": path, "features": features}


def _areas(counts: np.ndarray, classes, model_mpp: float) -> dict:
    px_mm2 = (model_mpp * 1e-3) ** 2
    tissue_px = int(counts[1:].sum())
    area = {name: int(counts[v]) * px_mm2 for v, name, _ in classes}
    pct = {name: round(100.0 * int(counts[v]) / tissue_px, 3) if tissue_px else 0.0
           for v, name, _ in classes}
    return {"tissue_area_mm2": tissue_px * px_mm2, "area_mm2": area,
            "percent_of_tissue": pct}


def _write_overlay(slide, writer, folder, classes, percent, stem) -> None:
    from wsiproto.export.report import overlay_image, save_png_atomic

    labels = writer.read_level(writer.num_levels - 1)
    h, w = labels.shape
    thumb, _ = slide.thumbnail(max_size=max(h, w))
    img = overlay_image(thumb, labels, classes, title=stem, areas=percent,
                        uncoloured=(classes[-1][0],))  # background: the slide as it is
    save_png_atomic(folder / "overlay.png", img)


__all__ = ["SegmentOptions", "SimulatedCrash", "config_hash", "process_chunk", "segment_slide",
           "slide_stem"]
