"""``segment_slide``: one slide in, the chosen outputs (OME-Zarr, GeoJSON, overlay) and a
summary out. The stages, each in its own module, in the order data flows through them:

1. plan (:mod:`.plan`): the label frame at the model's mpp, its chunk grid, the config hash,
   the tissue mask (thumbnail) and which chunks an earlier run finished (resume);
2. read (:mod:`.read`): a chunk's tiles and pixels, decoded on the engine's threads, one
   slide handle per thread;
3. infer + blend (:mod:`.infer`): tiles batched across chunks through the model; scores
   blended and argmaxed on the model's device; uint8 labels come back;
4. sinks (:mod:`.sinks`): each output writes its part of the chunk; then the done marker.

The chunks form a dask graph (``read -> infer -> one task per sink -> done`` per chunk), run
by dask's threaded scheduler on the engine's pool: dask orders it depth first, so a chunk's
outputs are written before far-away chunks are read and memory stays bounded by the pool's
threads (each holds at most one chunk's data), never by the slide. At most ``workers``
chunks are in inference at once (each holds a canvas on the model's device). Every thread
here runs at the lowest CPU priority, so on a CPU it takes only what the model leaves
(:mod:`.threads`).

Files: everything is written under ``OUT/<name>/.partial/`` and renamed into ``OUT/<name>/``
when every sink has finished; ``summary.json`` comes last and marks the run complete. A rerun
with the same configuration resumes from the chunks marked done.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.files import write_json_atomic
from wsiproto.segment.folder import (FolderLock, ensure_writable, output_name, prepare_output,
                                     remove_if_empty)
from wsiproto.segment.infer import BatchRunner, CanvasPool, infer_chunk, predictor_device
from wsiproto.segment.options import SegmentOptions, SegmentResult, SimulatedCrash
from wsiproto.segment.plan import Plan, make_plan, mark_done, scan_done
from wsiproto.segment.read import ChunkInput, SlidePool, read_chunk, read_threads
from wsiproto.segment.sinks import ChunkOutput, SinkContext, Totals, open_sinks
from wsiproto.segment.threads import lower_thread_priority

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_SKIPPED = object()  # a task's result when it did not run (see _Run._guarded)


def segment_slide(
    slide_path: str | os.PathLike,
    predictor,
    options: SegmentOptions | None = None,
    *,
    model_info: dict | None = None,
    runner: BatchRunner | None = None,
    echo: Callable[[str], None] | None = None,
) -> SegmentResult:
    """Segment one slide into ``OUT/<name>/`` (see the module doc).

    ``runner``: a shared :class:`BatchRunner` (a cohort worker keeps one); by default one is
    made for this slide and closed at the end. The output folder is locked for the run (a
    second run into it fails at once); a run that fails before writing anything leaves no
    folder behind. Process-wide settings (malloc arenas, the garbage collector) are the
    caller's: the CLI enters :func:`wsiproto.segment.threads.runtime`.
    """
    from wsiproto.slide import Slide

    opts = options or SegmentOptions()
    opts.check()
    echo = echo or (lambda msg: None)
    naming = output_name(slide_path)
    folder = Path(opts.out) / naming.name
    with Slide(slide_path, backend=opts.backend, mpp=opts.mpp) as slide:
        plan = make_plan(slide, predictor, opts, naming.name, model_info)
        if slide.mpp_source == "user" and slide.native_mpp is not None \
                and abs(slide.native_mpp / slide.mpp - 1) > 0.05:
            echo(f"warning: {slide.source}: --mpp {slide.mpp:g} overrides the slide's own "
                 f"{slide.native_mpp:g} um/px")
        existed = folder.exists()
        ensure_writable(folder)
        try:
            with FolderLock(folder):
                return _run_locked(slide, predictor, opts, plan, folder, runner, echo,
                                   naming.describe())
        except BaseException:
            if not existed:
                remove_if_empty(folder)
            raise


def _run_locked(slide, predictor, opts, plan: Plan, folder: Path, runner, echo, naming: dict):
    from wsiproto.slide import detect_tissue

    t_start = time.perf_counter()
    complete, partial = prepare_output(folder, plan.name, plan.cfg_hash, opts.overwrite)
    if complete:
        echo(f"{folder}: already complete for this configuration (hash {plan.cfg_hash}); "
             "nothing to do (--overwrite to redo)")
        return SegmentResult(json.loads((folder / "summary.json").read_text()), folder,
                             already_complete=True)
    t0 = time.perf_counter()
    plan.add_tissue(detect_tissue(slide))
    timings = {"tissue_s": time.perf_counter() - t0}
    with _disk_errors(folder):
        resuming = _open_partial(partial, plan)
        run = _Run(slide, predictor, opts, plan, partial, resuming, runner, echo)
        summary = run.execute(timings)
        summary["output_name"] = naming  # the slide's name, and the folder name it was given
        _move_outputs(partial, folder, summary["outputs"]["files"])
        summary["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        write_json_atomic(folder / "summary.json", summary)
    shutil.rmtree(partial, ignore_errors=True)
    chunks = summary["chunks"]
    return SegmentResult(summary, folder, chunks_resumed=chunks["resumed"],
                         chunks_run=chunks["run_now"], tiles_run=summary["tiles"]["run_now"])


@contextmanager
def _disk_errors(folder: Path):
    """A full disk (or quota, or a read-only file system) is the user's to fix: one line
    naming the folder, and the rerun resumes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        raise WsiprotoError(
            f"cannot write the outputs: {exc.strerror} ({exc.filename or folder})", path=folder,
            hint="free some space (or choose another --out) and rerun the same command: "
                 "finished chunks are kept") from exc


def _open_partial(partial: Path, plan: Plan) -> bool:
    """Resume (True) when ``.partial`` holds a run of this configuration, else start it
    afresh (prepare_output has refused a different configuration without --overwrite)."""
    try:
        same = json.loads((partial / "config.json").read_text())["config_hash"] == plan.cfg_hash
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        # made whole beside it, then renamed: a run killed here leaves either no .partial or
        # one with its config.json (never one that a rerun would take for another config's)
        shutil.rmtree(partial, ignore_errors=True)
        fresh = partial.with_name(f"{partial.name}.new-{os.getpid()}")
        shutil.rmtree(fresh, ignore_errors=True)
        (fresh / "done").mkdir(parents=True)
        write_json_atomic(fresh / "config.json",
                          {"config_hash": plan.cfg_hash, "config": plan.config})
        os.replace(fresh, partial)
    return same


def _move_outputs(partial: Path, folder: Path, files: list[str]) -> None:
    """Every output takes its final name only now (summary.json, written last, marks the
    run complete)."""
    for name in files:
        final = folder / name
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(partial / name, final)


def _areas(counts: np.ndarray, plan: Plan) -> Totals:
    px_mm2 = (plan.model_mpp * 1e-3) ** 2
    tissue_px = int(counts[1:].sum())
    area = {name: int(counts[v]) * px_mm2 for v, name, _ in plan.classes}
    pct = {name: round(100.0 * int(counts[v]) / tissue_px, 3) if tissue_px else 0.0
           for v, name, _ in plan.classes}
    return Totals(counts, tissue_px * px_mm2, area, pct)


def default_workers(opts: SegmentOptions, on_gpu: bool, tiles_per_chunk: int,
                    cores: int | None = None) -> int:
    """Chunks in inference at once: ``opts.workers``, else from the device and the cores. With
    the model on a CPU, 1: its threads take every core, and one chunk's tiles keep it busy
    (queued group by group while the last group is blended). On a GPU, enough chunks that
    their tiles fill two batches (each chunk holds a canvas there), at least 2 and at most
    half the cores (each needs a host thread to cut and queue its tiles)."""
    if opts.workers:
        return int(opts.workers)
    if not on_gpu:
        return 1
    cores = cores or os.cpu_count() or 2
    need = -(-2 * opts.batch_size // max(1, tiles_per_chunk))
    return max(2, min(need, cores // 2))


def pool_threads(workers: int, readers: int, on_gpu: bool, cores: int | None = None) -> int:
    """Threads of the chunk graph: the chunks in inference, the readers, and the exports
    (writing, tracing): one beside a CPU model, the cores left over beside a GPU. The export
    thread is what writes a finished chunk while the next ones are read, so that a read that
    fails (a server gone) leaves the chunks inferred before it done and kept (without it,
    tests/test_segment_inputs.py's dying server often found none finished)."""
    if not on_gpu:
        return workers + readers + 1
    cores = cores or os.cpu_count() or 2
    return workers + readers + max(2, cores - readers - 2)


class _Run:
    """One run's chunk work: the tasks of the dask graph and what they share."""

    def __init__(self, slide, predictor, opts, plan: Plan, partial: Path, resuming: bool,
                 runner, echo):
        self.slide, self.predictor, self.opts, self.plan = slide, predictor, opts, plan
        self.partial, self.resuming, self.echo = partial, resuming, echo
        self.own_runner = runner is None
        self.runner = runner
        device = predictor_device(predictor)
        self.on_gpu = device.type == "cuda"
        first = next(iter(plan.chunks))
        self.workers = default_workers(opts, self.on_gpu, len(plan.grid.tiles_for(first)))
        self.readers = read_threads(slide.backend, self.on_gpu)
        self.infer_slots = threading.BoundedSemaphore(self.workers)
        grid = plan.grid
        # a canvas per chunk in inference: the next chunk queues its first tiles before it
        # waits for one (see infer_chunk and _Slot)
        self.canvases = CanvasPool(device, len(plan.classes), grid.chunk, grid.tile,
                                   grid.overlap, limit=self.workers)
        self.pool = SlidePool(slide)
        self.clock: dict[str, float] = {}
        self.counts = np.zeros(256, np.int64)
        self.tiles = 0
        self.sinks: list = []
        self.error: BaseException | None = None  # the first task that failed
        self._lock = threading.Lock()
        self._started = 0
        self.progress = None

    # -- accounting ----------------------------------------------------------------------------
    def tick(self, name: str, seconds: float) -> None:
        with self._lock:
            self.clock[name] = self.clock.get(name, 0.0) + seconds

    # -- the tasks -----------------------------------------------------------------------------
    def read(self, chunk) -> ChunkInput:
        for sink in self.sinks:
            sink.check()  # a sink's background work failed: stop now, not after the slide
        need_image = any(s.needs_image for s in self.sinks)
        inp = read_chunk(self.plan, self.pool, chunk, need_image, clock=self.tick)
        if inp.positions:  # where labels may go: here, beside the model, not in its way
            t0 = time.thread_time()
            inp.inside = self.plan.inside(chunk, inp)
            self.tick("edges_s", time.thread_time() - t0)
        return inp

    def infer(self, inp: ChunkInput) -> ChunkOutput:
        for sink in self.sinks:
            sink.check()
        chunk = inp.chunk
        if self.opts.fail_after_chunks is not None:
            with self._lock:
                if self._started >= self.opts.fail_after_chunks:
                    raise SimulatedCrash(f"simulated crash before chunk {chunk.key}")
                self._started += 1
        rgb = None
        if inp.region is not None and any(s.needs_image for s in self.sinks):
            rgb = np.ascontiguousarray(inp.chunk_rgb())
        if not inp.positions:
            return ChunkOutput(chunk, None, rgb)
        with _Slot(self.infer_slots) as slot:
            labels, probs = infer_chunk(self.runner, self.canvases, inp,
                                        group=max(self.runner.batch_size, 16),
                                        probabilities=self.opts.probabilities,
                                        submitted=slot.release, clock=self.tick)
        labels *= inp.inside
        if probs is not None:
            probs *= inp.inside
        with self._lock:
            self.tiles += len(inp.positions)
        return ChunkOutput(chunk, labels, rgb, probs)

    def write(self, sink, out: ChunkOutput) -> None:
        t0 = time.thread_time()
        sink.write(out)
        self.tick(f"{sink.name.replace('-', '_')}_s", time.thread_time() - t0)

    def done(self, out: ChunkOutput, _writes) -> None:
        if out.labels is None:
            counts = np.zeros(256, np.int64)
            counts[0] = out.chunk.height * out.chunk.width
        else:
            counts = np.bincount(out.labels.ravel(), minlength=256)
        mark_done(self.partial, out.chunk, counts)
        with self._lock:
            self.counts += counts
        if self.progress is not None:
            self.progress.update(self.tiles)

    # -- the graph -----------------------------------------------------------------------------
    def _guarded(self, fn, *args):
        """Run a task unless the run has failed; a task whose input was skipped or failed is
        skipped. The first error is kept (raised after the graph), so that one failure stops
        new chunks from starting while the chunks already inferred are still written and
        marked done: a rerun resumes with them."""
        if any(a is _SKIPPED for a in args) or (fn in (self.read, self.infer) and self.error):
            return _SKIPPED
        if fn == self.done and any(w is _SKIPPED for w in args[1]):
            return _SKIPPED
        try:
            return fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised by execute() after the graph
            with self._lock:
                if self.error is None:
                    self.error = exc
            return _SKIPPED

    def graph(self, todo) -> tuple[dict, list[str]]:
        """``read -> infer -> one write per sink -> done`` for every chunk of ``todo``."""
        dsk: dict = {}
        keys = []
        g = self._guarded
        for i, c in enumerate(todo):
            # dask orders independent chains by descending key: number them down, so that
            # chunks run in grid order (as the GeoJSON stitches them) and each one's chain
            # (read, infer, writes, done) before the next one's
            tag = f"{len(todo) - i:07d}-{c.key}"
            read, infer, done = f"read-{tag}", f"infer-{tag}", f"done-{tag}"
            dsk[read] = (g, self.read, c)
            dsk[infer] = (g, self.infer, read)
            writes = []
            for sink in self.sinks:
                dsk[f"{sink.name}-{tag}"] = (g, self.write, sink, infer)
                writes.append(f"{sink.name}-{tag}")
            dsk[done] = (g, self.done, infer, writes)
            keys.append(done)
        return dsk, keys

    def _todo(self, done: dict) -> tuple[list, int, int]:
        """The chunks to run: every chunk with tissue, and every other chunk when an output
        stores the image, less those an earlier run finished (with every sink's part)."""
        everything = any(s.needs_image for s in self.sinks)
        chunks = [c for c in self.plan.chunks if everything or self.plan.has_tissue(c)]
        kept = {c.key for c in chunks if c.key in done and all(s.has(c) for s in self.sinks)}
        for key in kept:
            self.counts += done[key]
        for sink in self.sinks:
            sink.start(kept)
        return [c for c in chunks if c.key not in kept], len(kept), len(chunks)

    def execute(self, timings: dict) -> dict:
        import dask.threaded

        ctx = SinkContext(self.plan, self.opts, self.partial, self.slide, self.resuming)
        self.sinks = open_sinks(self.opts.outputs, ctx)
        done = scan_done(self.partial, self.plan.chunks) if self.resuming else {}
        todo, kept, total = self._todo(done)
        if not self.plan.tissue_keys:
            self.echo(f"warning: {self.slide.source}: no tissue detected; the outputs are "
                      "valid but empty")
        elif kept:
            self.echo(f"resuming: {kept} of {total} chunks already done")
        if self.own_runner:
            self.runner = BatchRunner(self.predictor, batch_size=self.opts.batch_size)
        threads = pool_threads(self.workers, self.readers, self.on_gpu)
        chunk_pool = ThreadPoolExecutor(threads, thread_name_prefix="wsiproto-chunk",
                                        initializer=lower_thread_priority)
        self.progress = _Progress(len(todo), self.opts.quiet, self.plan.name)
        busy_before = self.runner.busy_s
        t0 = time.perf_counter()
        try:
            dsk, keys = self.graph(todo)
            if keys:
                dask.threaded.get(dsk, keys, pool=chunk_pool, num_workers=threads)
            if self.error is not None:
                raise self.error
            timings["inference_s"] = time.perf_counter() - t0
            self._close(chunk_pool)
            outputs, t_export = self._finish(timings)
        except BaseException:
            self._close(chunk_pool)
            for sink in self.sinks:
                sink.abort()
            raise
        timings["export_wall_s"] = time.perf_counter() - t_export
        for name, seconds in sorted(self.clock.items()):
            timings[f"chunk_{name}"] = seconds
        return self._summary(outputs, timings, len(todo), kept, total,
                             self.runner.busy_s - busy_before)

    def _close(self, chunk_pool) -> None:
        """Stop the inference side (idempotent); waits for the threads it stops."""
        if self.own_runner and self.runner is not None:
            self.runner.close()  # chunk tasks still waiting for tiles (after an error) end now
        chunk_pool.shutdown(wait=True)  # no task reads the slide after this
        if self.progress is not None:
            self.progress.close()
        self.pool.close()

    def _finish(self, timings: dict) -> tuple[dict, float]:
        """Every sink's finish, side by side (they are independent)."""
        totals = _areas(self.counts.copy(), self.plan)
        t_export = time.perf_counter()
        with ThreadPoolExecutor(len(self.sinks), thread_name_prefix="wsiproto-finish") as ex:
            jobs = {s.name: ex.submit(_timed, s.finish, totals) for s in self.sinks}
            results = {name: job.result() for name, job in jobs.items()}
        outputs: dict = {"files": []}
        for name, (info, seconds) in results.items():
            timings[f"{name.replace('-', '_')}_s"] = round(seconds, 3)
            outputs["files"] += info.pop("files")
            for key, value in info.items():  # a sink's own timings go with the others
                (timings if key.endswith("_s") else outputs)[key] = value
        outputs["totals"] = totals
        return outputs, t_export

    def _summary(self, outputs: dict, timings: dict, run_now: int, kept: int, total: int,
                 model_busy: float) -> dict:
        slide, plan = self.slide, self.plan
        totals = outputs.pop("totals")
        return {
            "slide": {
                "path": slide.source, "backend": slide.backend, "vendor": slide.vendor,
                "width": slide.size[0], "height": slide.size[1], "mpp": slide.mpp,
                "mpp_source": slide.mpp_source, "native_mpp": slide.native_mpp,
            },
            "model": plan.config["model"],
            "config_hash": plan.cfg_hash,
            "config": plan.config["options"],
            "label_frame": {"height": plan.grid.height, "width": plan.grid.width,
                            "mpp": plan.model_mpp, "level0_px_per_label_px": plan.scale},
            "labels": [{"value": 0, "name": "unlabelled (no tissue)"}]
            + [{"value": v, "name": n, "color": list(c)} for v, n, c in plan.classes],
            "tissue_area_mm2": totals.tissue_area_mm2,
            "tissue_mask_area_mm2": round(plan.tissue.area_um2(slide.mpp) / 1e6, 6),
            "roi": None if plan.roi is None else plan.roi.describe(mpp=slide.mpp),
            "class_area_mm2": totals.area_mm2,
            "class_percent_of_tissue": totals.percent_of_tissue,
            "chunks": {"total": len(plan.chunks), "with_tissue": len(plan.tissue_keys),
                       "run_now": run_now, "resumed": kept, "visited": total},
            "tiles": {"run_now": self.tiles, "global_grid": plan.grid.total_tiles(),
                      "model_busy_s": round(model_busy, 3)},
            "outputs": {"folder": str(self.partial.parent), **outputs},
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }


class _Slot:
    """A semaphore's slot held from ``with`` until the first of :meth:`release` or the block's
    end: a chunk gives its inference slot back once its last tiles are queued, so the next
    chunk's tiles fill the model's batches while this one blends its last scores."""

    def __init__(self, semaphore: threading.Semaphore):
        self._sem, self._held = semaphore, False

    def __enter__(self) -> _Slot:
        self._sem.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._sem.release()

    def __exit__(self, *exc) -> None:
        self.release()


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


class _Progress:
    """A tqdm bar over chunks with tiles/s, thread-safe; silent with ``quiet``."""

    def __init__(self, total: int, quiet: bool, desc: str):
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._bar = None
        if not quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="chunk", leave=True, dynamic_ncols=True)

    def update(self, tiles: int) -> None:
        if self._bar is None:
            return
        with self._lock:
            rate = tiles / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{rate:.1f} tiles/s", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["default_workers", "pool_threads", "segment_slide"]
