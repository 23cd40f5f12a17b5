"""``segment_slide``: one slide in, OME-Zarr label pyramid + GeoJSON + summary + overlay out.

Flow: slide -> tissue mask (thumbnail) -> chunk grid at the model's mpp, restricted to tissue ->
a dask graph with one task per chunk, run in grid order. A chunk task takes its region (chunk
+ margin, read ahead by a prefetch thread), cuts tiles on the global tile grid, queues them
group by group on the shared :class:`BatchRunner` (the next group is queued before the last one
is blended, so the model does not wait for the task), blends by summed weights and takes the
argmax; then it hands the labels to the *finisher* threads and goes on to the next chunk. The
finisher writes the chunk's level-0 block and the pyramid levels that lie inside it, traces the
chunk's polygons (vectorised, ``wsiproto.export.trace``), serialises the ones that do not touch
a chunk seam to GeoJSON text, saves the trace, and only then marks the chunk done. A GeoJSON
thread adds the saved traces in grid order to a row-ordered writer, which joins the pieces of
regions crossing chunk seams as rows complete. After the model: the pyramid's small top levels
and the overlay on a side thread, the GeoJSON's last rows here, then the summary.

Memory is bounded by chunk size x chunks in flight (``workers`` chunk tasks, as many chunks
read ahead and as many being finished), never by the slide: no full-resolution array of the
slide or of its labels exists at any point; the GeoJSON holds only the regions still open at the
current row of chunks.

Files under ``OUT/<stem>/``: ``<stem>.ome.zarr``, ``<stem>.geojson[.gz]``, ``overlay.png`` and
``summary.json``. ``summary.json`` is written last: its presence with the same config hash means
the run is complete. Work in progress lives in ``OUT/<stem>/.partial/`` (the zarr store being
written, ``config.json``, ``traces/<chunk>.npz`` with each finished chunk's polygons and label
counts, one marker file per finished chunk in ``done/``); a rerun with the same config resumes
there and redoes only chunks without a marker (their labels, pyramid blocks and traces).

Timings in the summary: wall seconds per stage (``tissue_s``, ``inference_s`` up to the last
chunk finished, then ``geojson_s``, ``pyramid_s``, ``overlay_s``, which partly overlap:
``export_wall_s``), and ``chunk_*_s``: CPU seconds the chunk work took per step, summed over
chunks, on the threads beside the model (zarr's compression threads not included).
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
from wsiproto.segment.folder import (FolderLock, ensure_writable, output_name, prepare_output,
                                     remove_if_empty)
from wsiproto.segment.grid import Chunk, ChunkGrid
from wsiproto.segment.infer import BatchRunner, TilePredictor, blend_tiles
from wsiproto.segment.threads import limit_malloc_arenas, lower_thread_priority, responsive_gil

log = logging.getLogger(__name__)

MAX_UPSAMPLING = 4.0
SCHEMA = 2  # bump when the outputs (or the files of an unfinished run) change


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
    roi: str | None = None  # a QuPath GeoJSON of regions: segment only inside them
    roi_class: str | None = None  # only the ROI features of this classification
    overwrite: bool = False
    quiet: bool = False
    # chunk tasks in flight (threads cutting and blending); as many chunks are read ahead and
    # as many finished (written, traced) beside them. None: 1 when the model runs on the CPU
    # (it uses every core; one task keeps it fed, see chunk_workers), 2 on a GPU
    workers: int | None = None
    fail_after_chunks: int | None = field(default=None, repr=False)  # tests: simulate a crash

    def output_config(self) -> dict:
        keys = ("overlap", "chunk", "zarr_chunk", "mpp", "ngff_version", "objects", "gzip",
                "probabilities", "image", "roi", "roi_class")
        return {k: getattr(self, k) for k in keys}


def chunk_workers(opts: SegmentOptions, predictor) -> int:
    """Chunk tasks in flight: ``opts.workers``, or by default 1 with the model on a CPU and 2
    on a GPU. On a CPU the model's threads take every core and a chunk's tiles go to it group
    by group while the last group is blended, so one task keeps it as busy as two (measured on
    2 cores with benchmarks/segment_efficiency.py: 0.84-0.85 either way) while a second one
    adds its blend buffers, queued scores and read-ahead region to the peak memory (about
    340 MB more on a 40k^2 slide)."""
    if opts.workers:
        return max(1, int(opts.workers))
    return 2 if getattr(predictor, "cuda", False) else 1


class SimulatedCrash(RuntimeError):
    """Raised by ``fail_after_chunks`` (tests of resume)."""


def _class_table(predictor: TilePredictor) -> list[tuple[int, str, tuple[int, int, int]]]:
    """Label values: 0 unlabelled (outside tissue), 1..K the classes, K+1 background."""
    rows = [(i + 1, name, tuple(rgb)) for i, (name, rgb) in enumerate(predictor.classes)]
    bg_name, bg_rgb = predictor.background
    rows.append((len(rows) + 1, bg_name, tuple(bg_rgb)))
    return rows


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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

    def __init__(self, slide):
        self._slide = slide
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()

    def get(self):
        slide = getattr(self._local, "slide", None)
        if slide is None:
            slide = self._slide.clone()
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
    formatter: Any = None  # GeoJSON FeatureFormatter: trace the chunk in its task
    trace_dir: Path | None = None
    levels: int = 0  # pyramid levels above 0 written by the chunk task itself
    in_flight: int = 2  # model requests a chunk keeps queued (each: group x 1 MB of scores)
    on_done: Callable[[str], None] | None = None  # told the key of every finished chunk
    prefetch: Any = None  # a _Prefetcher reading chunks ahead of the tasks
    clock: dict = field(default_factory=dict)  # CPU s per in-task step, summed over chunks
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def canvas(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed blend buffers (score sums [K+1, h, w], weight sums [h, w]) of this thread,
        reused from chunk to chunk: a fresh 80 MB array per chunk costs page faults on every
        first write, more than clearing the old one."""
        local = self.__dict__.setdefault("_local", threading.local())
        k1 = self.num_values - 1  # classes + background
        size = self.grid.chunk
        if getattr(local, "acc", None) is None or local.acc.shape[1] < h or local.acc.shape[2] < w:
            local.acc = np.empty((k1, max(size, h), max(size, w)), np.float32)
            local.wsum = np.empty((max(size, h), max(size, w)), np.float32)
        acc, wsum = local.acc[:, :h, :w], local.wsum[:h, :w]
        acc.fill(0)
        wsum.fill(0)
        return acc, wsum

    def scratch(self, name: str) -> dict:
        """A dict of scratch buffers private to this thread."""
        local = self.__dict__.setdefault("_local", threading.local())
        return local.__dict__.setdefault(f"scratch_{name}", {})

    def tick(self, name: str, since: float) -> float:
        """Add the CPU seconds this thread spent since ``since`` (``time.thread_time``)."""
        now = time.thread_time()
        with self._lock:
            self.clock[name] = self.clock.get(name, 0.0) + now - since
        return now


def _tissue_pixels(run: _Run, chunk: Chunk) -> np.ndarray:
    """Nearest-neighbour lookup of the tissue mask at the chunk's label-pixel centres. The
    indices come in runs (a mask pixel covers many label pixels): gather the few distinct
    rows and columns, then repeat them, instead of gathering every pixel."""
    m, d = run.tissue.mask, run.tissue.downsample
    ys = ((np.arange(chunk.y0, chunk.y0 + chunk.height) + 0.5) * run.scale / d).astype(np.int64)
    xs = ((np.arange(chunk.x0, chunk.x0 + chunk.width) + 0.5) * run.scale / d).astype(np.int64)
    ys = np.clip(ys, 0, m.shape[0] - 1)
    xs = np.clip(xs, 0, m.shape[1] - 1)
    uy, ny = np.unique(ys, return_counts=True)  # ys, xs are non-decreasing
    ux, nx = np.unique(xs, return_counts=True)
    return np.repeat(np.repeat(m[uy][:, ux], ny, axis=0), nx, axis=1)


def _argmax_planes(acc: np.ndarray, work: dict | None = None) -> np.ndarray:
    """``np.argmax(acc, axis=0)`` as uint8, one contiguous class plane at a time (the strided
    reduction over the first axis is several times slower); ties go to the first, as there.
    Plane k wins where it beats the best so far, and k grows, so the index is a running
    maximum of ``k * (plane k wins)``: no masked writes (slow on scattered masks).
    ``work``: scratch buffers kept between calls (a dict owned by one thread)."""
    shape = acc.shape[1:]
    work = {} if work is None else work
    if work.get("shape") != shape:
        work.update(shape=shape, best=np.empty(shape, acc.dtype), wins=np.empty(shape, bool),
                    k_wins=np.empty(shape, np.uint8))
    best, wins, k_wins = work["best"], work["wins"], work["k_wins"]
    np.copyto(best, acc[0])
    idx = np.zeros(shape, np.uint8)
    for k in range(1, acc.shape[0]):
        np.greater(acc[k], best, out=wins)
        np.multiply(wins.view(np.uint8), np.uint8(k), out=k_wins)
        np.maximum(idx, k_wins, out=idx)
        np.maximum(best, acc[k], out=best)
    return idx


def _blend_chunk(run: _Run, chunk: Chunk, positions, region, ry0: int, rx0: int):
    """Run the chunk's tiles through the model group by group and blend them; the next group
    is queued before the last one is blended, so the model always has this chunk's work."""
    grid, t = run.grid, run.grid.tile
    acc, wsum = run.canvas(chunk.height, chunk.width)
    groups = [positions[g : g + run.group] for g in range(0, len(positions), run.group)]

    def submit(group):
        tiles = np.stack([region[ty - ry0 : ty - ry0 + t, tx - rx0 : tx - rx0 + t]
                          for ty, tx in group])
        return run.runner.submit(tiles)

    # Tiles go to the model and into the blend group by group: the scores of a whole chunk
    # (about 1 MB per tile) never exist at once.
    queued = [(g, submit(g)) for g in groups[: run.in_flight]]
    nxt = len(queued)
    while queued:
        group, pending = queued.pop(0)
        scores = pending.result()
        if nxt < len(groups):
            queued.append((groups[nxt], submit(groups[nxt])))
            nxt += 1
        t0 = time.thread_time()
        blend_tiles(scores, group, (chunk.y0, chunk.x0), (chunk.height, chunk.width),
                    grid.overlap, out=(acc, wsum), consume=True)
        del scores
        run.tick("blend_s", t0)
    return acc, wsum


def read_chunk(run: _Run, chunk: Chunk):
    """The tissue tiles of a chunk (label-frame positions) and the image region they cover:
    (positions, region or None, region's y0, x0)."""
    grid, t, s = run.grid, run.grid.tile, run.scale
    positions = [
        (ty, tx) for ty, tx in grid.tiles_for(chunk)
        if run.tissue.region_has_tissue(tx * s, ty * s, t * s, t * s)
    ]
    if not positions:
        return positions, None, 0, 0
    ry0 = min(p[0] for p in positions)
    rx0 = min(p[1] for p in positions)
    ry1 = max(p[0] for p in positions) + t
    rx1 = max(p[1] for p in positions) + t
    t0 = time.thread_time()
    slide = run.pool.get()
    region = slide.read_region((rx0 * s, ry0 * s), (rx1 - rx0, ry1 - ry0), mpp=run.model_mpp)
    run.tick("read_s", t0)
    return positions, region, ry0, rx0


def infer_chunk(run: _Run, chunk: Chunk):
    """The model's part of a chunk: read it (or take what ``run.prefetch`` read ahead), run
    its tiles, blend, argmax. Returns the number of tiles and (labels, rgb or None,
    probabilities or None) for :func:`finish_parts`."""
    s = run.scale
    if run.prefetch is not None:
        positions, region, ry0, rx0 = run.prefetch.take(chunk)
    else:
        positions, region, ry0, rx0 = read_chunk(run, chunk)
    labels = np.zeros((chunk.height, chunk.width), np.uint8)
    rgb = probs = None
    if positions:
        acc, wsum = _blend_chunk(run, chunk, positions, region, ry0, rx0)
        t0 = time.thread_time()
        inside = _tissue_pixels(run, chunk) & (wsum > 0)
        labels = _argmax_planes(acc, run.scratch("argmax"))
        labels += np.uint8(1)
        labels *= inside
        if run.probabilities:
            probs = acc / np.maximum(wsum, 1e-12)
            probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
            probs = np.where(inside, probs, 0.0)
            probs = (probs * 255).round().astype(np.uint8)
        del acc, wsum
        if run.image:
            oy, ox = chunk.y0 - ry0, chunk.x0 - rx0
            rgb = region[max(oy, 0) : oy + chunk.height, max(ox, 0) : ox + chunk.width]
            if rgb.shape[:2] != (chunk.height, chunk.width):  # tiles did not cover it all
                full = np.full((chunk.height, chunk.width, 3), 255, np.uint8)
                full[max(-oy, 0) : max(-oy, 0) + rgb.shape[0],
                     max(-ox, 0) : max(-ox, 0) + rgb.shape[1]] = rgb
                rgb = full
        del region
        run.tick("labels_s", t0)
    if run.image and rgb is None:
        slide = run.pool.get()
        rgb = slide.read_region((chunk.x0 * s, chunk.y0 * s), (chunk.width, chunk.height),
                                mpp=run.model_mpp)
    return len(positions), (labels, rgb, probs)


def finish_parts(run: _Run, chunk: Chunk, labels, rgb, probs) -> list[Callable[[], None]]:
    """The export part of a chunk, as independent steps (they may run in parallel): write its
    level-0 block and inline pyramid levels; trace its polygons and save the trace. The chunk's
    done marker (:func:`_mark_done`) must come after both: a chunk without one is redone whole
    on resume."""

    def write():
        t0 = time.thread_time()
        run.writer.write_block(chunk.y0, chunk.x0, labels, rgb=rgb, probs=probs,
                               levels=run.levels)
        run.tick("write_s", t0)

    def trace():
        from wsiproto.export.geojson import trace_block

        t0 = time.thread_time()
        traced = trace_block(labels, chunk.y0, chunk.x0, run.formatter, pixel_counts=True,
                             scratch=run.scratch("trace"))
        traced.save(run.trace_dir / f"{chunk.key}.npz")
        run.tick("trace_s", t0)

    return [trace, write]


def _trace_readable(path: Path) -> bool:
    try:
        with np.load(path) as z:
            return "meta" in z.files
    except Exception:  # noqa: BLE001 - missing, truncated or not a zip: redo the chunk
        return False


def _mark_done(run: _Run, chunk: Chunk) -> None:
    (run.done_dir / chunk.key).touch()
    if run.on_done is not None:
        run.on_done(chunk.key)


class _GeoJSONStream:
    """Builds the GeoJSON while the model still runs: a thread adds the chunks' saved traces
    to a row-ordered :class:`GeoJSONWriter` as soon as the next chunk in grid order is
    finished, so only the last chunks are left to stitch after the model. ``counts``: the
    label histogram of all added chunks."""

    def __init__(self, writer, trace_dir: Path, keys: list[str], done: set[str]):
        self.writer, self.trace_dir, self.keys = writer, trace_dir, keys
        self.counts = np.zeros(256, np.int64)
        self.busy_s = 0.0
        self._ready = set(done)
        self._cond = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self.all_added = threading.Event()  # set when the thread stops
        self.complete = False  # every chunk went in: ``counts`` is final
        self._thread = threading.Thread(target=self._loop, name="wsiproto-geojson", daemon=True)
        self._thread.start()

    def ready(self, key: str) -> None:
        with self._cond:
            self._ready.add(key)
            self._cond.notify()

    def _loop(self) -> None:
        from wsiproto.export.trace import BlockTrace

        lower_thread_priority()
        try:
            for key in self.keys:
                with self._cond:
                    while key not in self._ready and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                t0 = time.perf_counter()
                trace = BlockTrace.load(self.trace_dir / f"{key}.npz")
                self.counts += trace.pixel_counts
                self.writer.add_trace(trace)
                self.busy_s += time.perf_counter() - t0
            self.complete = True
        except BaseException as exc:  # noqa: BLE001 - handed to finish()
            self.error = exc
        finally:
            self.all_added.set()

    def finish(self) -> dict:
        """Wait for the last chunks, close the writer (file in place); its stats."""
        self._thread.join()
        if self.error is not None:
            self.writer.abort()
            raise self.error
        t0 = time.perf_counter()
        stats = self.writer.close()
        self.busy_s += time.perf_counter() - t0
        return stats

    def abort(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        self.writer.abort()


class _Prefetcher:
    """Reads chunks ahead of the chunk tasks, in the order the tasks take them, at most
    ``depth`` regions ahead (memory: that many regions), on one thread: a task then finds its
    region ready and the model never waits for two chunks to be read at once. A task asking
    for a chunk that was not read ahead reads it itself."""

    def __init__(self, run: _Run, chunks: list[Chunk], depth: int):
        from concurrent.futures import ThreadPoolExecutor

        self._run = run
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="wsiproto-read",
                                        initializer=lower_thread_priority)
        self._permits = threading.Semaphore(max(1, depth))
        self._cond = threading.Condition()
        self._futures: dict[str, Any] = {}
        self._claimed: set[str] = set()
        self._stop = False
        self._feeder = threading.Thread(target=self._feed, args=(list(chunks),),
                                         name="wsiproto-read-ahead", daemon=True)
        self._feeder.start()

    def _feed(self, chunks: list[Chunk]) -> None:
        lower_thread_priority()
        for chunk in chunks:
            while not self._permits.acquire(timeout=0.25):
                if self._stop:
                    return
            with self._cond:
                if self._stop:
                    return
                if chunk.key in self._claimed:  # its task came first and read it
                    self._permits.release()
                    continue
                self._futures[chunk.key] = self._pool.submit(read_chunk, self._run, chunk)

    def take(self, chunk: Chunk):
        with self._cond:
            future = self._futures.pop(chunk.key, None)
            if future is None:
                self._claimed.add(chunk.key)
        if future is None:
            return read_chunk(self._run, chunk)
        try:
            return future.result()
        finally:
            self._permits.release()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            futures, self._futures = list(self._futures.values()), {}
        for f in futures:
            f.cancel()
        self._feeder.join()
        self._pool.shutdown(wait=True)


class _Finisher:
    """Finishes chunks on its own threads (``slots`` of them), so a chunk task goes on to read
    the next chunk (and keep the model fed) while its last one is written and traced; the parts
    of one chunk run in parallel when threads are free (at the end of a run they are). At most
    ``slots`` chunks wait or run here (memory: their labels and image); ``submit`` blocks
    beyond that. A chunk's ``then`` (its done marker) runs after all its parts succeeded.
    Errors come back on the next ``submit`` or on ``drain``."""

    def __init__(self, slots: int):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max(1, slots), thread_name_prefix="wsiproto-finish",
                                        initializer=lower_thread_priority)
        self._slots = threading.BoundedSemaphore(max(1, slots))
        self._futures: list = []
        self._lock = threading.Lock()

    def _check(self) -> None:
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()

    def submit(self, parts: list[Callable[[], None]], then: Callable[[], None]) -> None:
        self._check()
        self._slots.acquire()
        state = {"left": len(parts), "ok": True}
        lock = threading.Lock()

        def run_part(part):
            ok = False
            try:
                part()
                ok = True
            finally:
                with lock:
                    state["left"] -= 1
                    state["ok"] &= ok
                    last = state["left"] == 0
                if last:
                    try:
                        if state["ok"]:
                            then()
                    finally:
                        self._slots.release()

        futures = []
        try:
            for part in parts:
                futures.append(self._pool.submit(run_part, part))
        except BaseException:
            # the parts that could not be queued count as failed ones: the chunk gets no
            # marker, and its slot comes back once the queued parts are over
            with lock:
                state["left"] -= len(parts) - len(futures)
                state["ok"] = False
                last = state["left"] == 0
            if last:
                self._slots.release()
            raise
        finally:
            with self._lock:
                self._futures.extend(futures)

    def drain(self) -> None:
        """Wait for everything submitted; raise the first error."""
        with self._lock:
            futures, self._futures = self._futures, []
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class SegmentResult:
    """What :func:`segment_slide` did: the summary (as written to ``summary.json``), where,
    and how the run went. ``already_complete``: the folder held this configuration's finished
    results and nothing ran; ``chunks_resumed``: chunks an interrupted earlier run had finished
    (not run again)."""

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


def segment_slide(
    slide_path: str | os.PathLike,
    predictor: TilePredictor,
    options: SegmentOptions | None = None,
    *,
    model_info: dict | None = None,
    runner: BatchRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> SegmentResult:
    """Segment one slide into ``OUT/<name>/``; the summary is also written to ``summary.json``.

    ``runner``: a shared :class:`BatchRunner` (cohorts reuse one per worker); by default one is
    made for this slide and closed at the end. The folder is locked for the run (a second run
    into it fails at once); a run that fails before writing anything leaves no folder behind.

    One process-wide effect: the first call limits glibc's malloc to one arena shared by all
    threads (bounded memory when buffers cross threads, see ``threads.limit_malloc_arenas``;
    set ``MALLOC_ARENA_MAX`` to decide otherwise). The threads this function starts run at a
    lower priority and end with it.
    """
    import gc

    limit_malloc_arenas()  # buffers cross threads: one shared heap (threads.py)
    # The objects alive now (the model, torch, the libraries) are not garbage; keep the cyclic
    # collector from scanning them during the run (one full collection over a loaded model
    # costs ~0.2 s, on the model's time). Undone at the end.
    gc.freeze()
    try:
        return _segment_slide(slide_path, predictor, options, model_info, runner, echo)
    finally:
        gc.unfreeze()


def _check_scale(slide, model_mpp: float) -> float:
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


def _segment_slide(slide_path, predictor, options, model_info, runner, echo) -> SegmentResult:
    from wsiproto.slide import Slide

    opts = options or SegmentOptions()
    echo = echo or (lambda msg: None)
    naming = output_name(slide_path)
    folder = Path(opts.out) / naming.name
    slide = Slide(slide_path, backend=opts.backend, mpp=opts.mpp)
    try:
        model_mpp = float(predictor.mpp)
        scale = _check_scale(slide, model_mpp)
        if slide.mpp_source == "user" and slide.native_mpp is not None \
                and abs(slide.native_mpp / slide.mpp - 1) > 0.05:
            echo(f"warning: {slide.source}: --mpp {slide.mpp:g} overrides the slide's own "
                 f"{slide.native_mpp:g} um/px")
        tile = int(predictor.tile_size)
        overlap = tile // 4 if opts.overlap is None else int(opts.overlap)
        if not 0 <= overlap < tile:
            raise WsiprotoError(f"--overlap must be between 0 and {tile - 1} px (got {overlap})")
        if opts.chunk <= 0 or opts.chunk % opts.zarr_chunk:
            raise WsiprotoError(f"--chunk-size must be a positive multiple of {opts.zarr_chunk} "
                                f"(got {opts.chunk})", hint=f"e.g. --chunk-size 2048")
        fw, fh = slide.size
        height, width = max(1, math.ceil(fh / scale)), max(1, math.ceil(fw / scale))
        grid = ChunkGrid(height, width, opts.chunk, tile, overlap)
        existed = folder.exists()
        ensure_writable(folder)
        lock = FolderLock(folder)
        try:
            lock.acquire()
        except BaseException:
            if not existed:
                remove_if_empty(folder)
            raise
        try:
            return _run_locked(slide, predictor, opts, grid, scale, folder, naming, model_info,
                               runner, echo)
        except BaseException:
            if not existed:
                remove_if_empty(folder)
            raise
        finally:
            lock.release()
    finally:
        slide.close()


def _run_locked(slide, predictor, opts, grid, scale, folder, naming, model_info, runner,
                echo) -> SegmentResult:
    from wsiproto.files import write_json_atomic
    from wsiproto.slide import detect_tissue

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    stem = naming.name
    classes = _class_table(predictor)
    config = {
        "schema": SCHEMA,
        "slide": slide.identity(),
        "slide_mpp": slide.mpp,
        "model": model_info or getattr(predictor, "describe", lambda: {})(),
        "options": {**opts.output_config(), "overlap": grid.overlap},
    }
    cfg_hash = config_hash(config)
    complete, partial = prepare_output(folder, stem, cfg_hash, opts.overwrite)
    if complete:
        echo(f"{folder}: already complete for this configuration (hash {cfg_hash}); "
             "nothing to do (--overwrite to redo)")
        summary = json.loads((folder / "summary.json").read_text())
        return SegmentResult(summary, folder, already_complete=True)

    t0 = time.perf_counter()
    tissue = detect_tissue(slide)
    timings["tissue_s"] = time.perf_counter() - t0
    summary = _run_chunks_and_export(
        slide, predictor, opts, grid, scale, float(predictor.mpp), tissue, folder, partial,
        stem, classes, config, cfg_hash, timings, runner, echo,
    )
    summary["output_name"] = naming.describe()
    summary["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    write_json_atomic(folder / "summary.json", summary)
    shutil.rmtree(partial, ignore_errors=True)
    chunks = summary["chunks"]
    return SegmentResult(summary, folder,
                         chunks_resumed=chunks["with_tissue"] - chunks["run_now"],
                         chunks_run=chunks["run_now"], tiles_run=summary["tiles"]["run_now"])


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
    (partial / "traces").mkdir()
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
    import dask.threaded

    done_dir = partial / "done"
    trace_dir = partial / "traces"
    all_chunks = list(grid.chunks())
    with_tissue = [c for c in all_chunks
                   if tissue.region_has_tissue(c.x0 * scale, c.y0 * scale,
                                               c.width * scale, c.height * scale)]
    # _open_writer resumes exactly when the store and its config exist (else starts afresh)
    resuming = (partial / f"{stem}.ome.zarr").exists() and (partial / "config.json").exists()
    done = {p.name for p in done_dir.iterdir()} if resuming and done_dir.is_dir() else set()
    # A marker whose trace cannot be read (a crash or power loss between the two reaching the
    # disk) does not count: that chunk is redone, rather than failing the GeoJSON at the end.
    lost = {k for k in done if not _trace_readable(trace_dir / f"{k}.npz")}
    for key in lost:
        (done_dir / key).unlink(missing_ok=True)
    done -= lost
    todo = [c for c in with_tissue if c.key not in done]
    if not with_tissue:
        echo(f"warning: {slide.source}: no tissue detected; the outputs are valid but empty")
    elif len(todo) < len(with_tissue):
        echo(f"resuming: {len(with_tissue) - len(todo)} of {len(with_tissue)} chunks already done")

    own_runner = runner is None
    runner = runner or BatchRunner(predictor, batch_size=opts.batch_size)
    pool = _SlidePool(slide)
    tissue_classes = classes[:-1]  # background inside tissue is not exported as objects
    run = _Run(grid, scale, model_mpp, tissue, pool, runner, None, done_dir,
               opts.probabilities, opts.image, len(classes) + 1,
               group=max(opts.batch_size, 16), trace_dir=trace_dir)
    from concurrent.futures import ThreadPoolExecutor

    # The first chunks are read while the output store is created.
    workers = chunk_workers(opts, predictor)
    run.prefetch = _Prefetcher(run, todo, depth=workers)
    finisher = _Finisher(workers)
    # work without the model; every thread started here runs below the model (threads.py)
    side = ThreadPoolExecutor(1, thread_name_prefix="wsiproto-side",
                              initializer=lower_thread_priority)
    chunk_pool = ThreadPoolExecutor(workers, thread_name_prefix="wsiproto-chunk",
                                    initializer=lower_thread_priority)
    progress = _Progress(len(todo), opts.quiet, desc=stem)
    stream = None
    closed = []

    def close_inference() -> None:  # idempotent; waits for the threads it stops
        if closed:
            return
        closed.append(True)
        if own_runner:
            runner.close()  # chunk tasks still waiting for tiles (after an error) end now
        chunk_pool.shutdown(wait=True)  # no task reads the slide after this
        run.prefetch.close()
        finisher.close()  # waits: a chunk is either finished (marker) or not touched at all
        progress.close()
        pool.close()

    counter = {"chunks": 0}
    lock = threading.Lock()

    def task(chunk: Chunk) -> int:
        if stream is not None and stream.error is not None:
            # the GeoJSON thread failed: stop now rather than after the whole slide
            raise RuntimeError(f"GeoJSON export failed: {stream.error}") from stream.error
        if opts.fail_after_chunks is not None:
            with lock:
                if counter["chunks"] >= opts.fail_after_chunks:
                    raise SimulatedCrash(f"simulated crash before chunk {chunk.key}")
                counter["chunks"] += 1
        n, result = infer_chunk(run, chunk)
        finisher.submit(finish_parts(run, chunk, *result), lambda: _mark_done(run, chunk))
        progress.update(n)
        return n

    try:
        writer = _open_writer(partial, stem, grid, model_mpp, classes, opts, cfg_hash, config)
        run.writer, run.levels = writer, writer.inline_levels(opts.chunk)

        def thumbnail():  # for the overlay; C code, mostly outside the GIL
            t = time.perf_counter()
            thumb, _ = slide.thumbnail(max_size=max(writer.shapes[-1]))
            return thumb, time.perf_counter() - t

        thumb_job = side.submit(thumbnail)
        stream = _GeoJSONStream(_geojson_writer(partial, stem, grid, scale, tissue_classes, opts,
                                                slide.mpp),
                                trace_dir, [c.key for c in with_tissue], done)
        run.on_done = stream.ready
        run.formatter = stream.writer.formatter  # the chunk tasks serialise as the writer does
        busy_before = runner.busy_s
        t0 = time.perf_counter()
        try:
            # dask runs independent tasks in descending key order: number the keys down so that
            # chunks run in grid order, as the GeoJSON stream and the seam stitching use them.
            tasks = [dask.delayed(task, pure=False)(
                c, dask_key_name=f"chunk-{len(todo) - i:07d}-{c.key}") for i, c in enumerate(todo)]
            # The threaded scheduler passed as a function: naming it ("threads") makes dask
            # import dask.distributed to look for a client first (0.3 s per process). Our own
            # pool: its threads run at a lower priority and end with the run.
            with responsive_gil():
                tile_counts = dask.compute(*tasks, scheduler=dask.threaded.get,
                                           pool=chunk_pool) if tasks else ()
            finisher.drain()
        finally:
            close_inference()
        timings["inference_s"] = time.perf_counter() - t0
        model_busy = runner.busy_s - busy_before

        # The GeoJSON's last rows are stitched here while the side thread builds the pyramid's
        # top levels and then, as soon as every chunk's label counts are in, the overlay.
        def pyramid_and_overlay():
            t = time.perf_counter()
            writer.build_pyramid(num_workers=max(2, workers), start=run.levels + 1)
            writer.finalize()
            pyramid_s = time.perf_counter() - t
            thumb, thumb_s = thumb_job.result()
            stream.all_added.wait()
            if not stream.complete:
                return None
            t = time.perf_counter()
            percent = _areas(stream.counts, classes, model_mpp)
            labels = writer.read_level(writer.num_levels - 1)
            _write_overlay(labels, thumb, partial, classes, percent["percent_of_tissue"], stem)
            return pyramid_s, thumb_s + time.perf_counter() - t, percent

        t_export = time.perf_counter()
        side_job = side.submit(pyramid_and_overlay)
        t0 = time.perf_counter()
        stats = stream.finish()
        geo = {"path": stream.writer.path, "features": stats["features"]}
        timings["geojson_s"] = time.perf_counter() - t0  # after the model; the rest overlapped
        timings["geojson_busy_s"] = stream.busy_s
        side_result = side_job.result()
        if side_result is None:
            raise RuntimeError("the GeoJSON stream stopped before all chunks were added")
        timings["pyramid_s"], timings["overlay_s"], percent = side_result
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    finally:
        close_inference()
        side.shutdown(wait=True)
    timings["export_wall_s"] = time.perf_counter() - t_export
    # CPU seconds the chunk tasks spent on each step, summed over chunks (beside the model).
    for name, seconds in sorted(run.clock.items()):
        timings[f"chunk_{name}"] = seconds

    # Everything was written under .partial/; only now do the outputs take their final names
    # (summary.json, written last by the caller, marks the run complete).
    final_zarr = folder / f"{stem}.ome.zarr"
    if final_zarr.exists():
        shutil.rmtree(final_zarr)
    os.replace(partial / f"{stem}.ome.zarr", final_zarr)
    for name in (geo["path"].name, "overlay.png"):
        os.replace(partial / name, folder / name)

    return {
        "slide": {
            "path": slide.source, "backend": slide.backend, "vendor": slide.vendor,
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


def _geojson_writer(partial, stem, grid, scale, tissue_classes, opts, slide_mpp):
    """The GeoJSON writer of a run; chunks' traces go in row by row, as the grid lists them."""
    from wsiproto.export.geojson import GeoJSONWriter

    path = partial / (f"{stem}.geojson.gz" if opts.gzip else f"{stem}.geojson")
    return GeoJSONWriter(
        path, classes=tissue_classes, scale=scale, object_type=opts.objects, gzip=opts.gzip,
        mpp=slide_mpp, chunk_shape=(grid.chunk, grid.chunk),
        label_shape=(grid.height, grid.width), rows_in_order=True,
    )


def _areas(counts: np.ndarray, classes, model_mpp: float) -> dict:
    px_mm2 = (model_mpp * 1e-3) ** 2
    tissue_px = int(counts[1:].sum())
    area = {name: int(counts[v]) * px_mm2 for v, name, _ in classes}
    pct = {name: round(100.0 * int(counts[v]) / tissue_px, 3) if tissue_px else 0.0
           for v, name, _ in classes}
    return {"tissue_area_mm2": tissue_px * px_mm2, "area_mm2": area,
            "percent_of_tissue": pct}


def _write_overlay(labels, thumb, folder, classes, percent, stem) -> None:
    from wsiproto.export.report import overlay_image, save_png_atomic

    img = overlay_image(thumb, labels, classes, title=stem, areas=percent,
                        uncoloured=(classes[-1][0],))  # background: the slide as it is
    save_png_atomic(folder / "overlay.png", img)


__all__ = ["SegmentOptions", "SegmentResult", "SimulatedCrash", "chunk_workers", "config_hash",
           "finish_parts", "infer_chunk", "segment_slide"]
