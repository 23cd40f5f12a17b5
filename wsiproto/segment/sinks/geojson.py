"""``geojson``: QuPath GeoJSON of the class regions (:mod:`wsiproto.export.geojson`).

Each chunk is traced where it finishes (vectorised numpy, on the engine's threads) and its
trace saved under ``.partial/traces``; a thread of this sink adds the traces to a row-ordered
:class:`~wsiproto.export.geojson.GeoJSONWriter` in grid order as soon as the next one is
there, joining regions across chunk seams as rows complete, so only the last rows are left
to stitch when the model is done. A resumed run replays the saved traces of finished chunks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from wsiproto.segment.sinks import ChunkOutput, Sink, SinkContext, Totals, register
from wsiproto.segment.threads import lower_thread_priority


def trace_readable(path: Path) -> bool:
    try:
        with np.load(path) as z:
            return "meta" in z.files
    except Exception:  # noqa: BLE001 - missing, truncated or not a zip: redo the chunk
        return False


@register("geojson")
class GeoJSONSink(Sink):
    def __init__(self, ctx: SinkContext):
        from wsiproto.export.geojson import GeoJSONWriter

        super().__init__(ctx)
        plan, opts = ctx.plan, ctx.opts
        self.traces = ctx.partial / "traces"
        self.traces.mkdir(exist_ok=True)
        self.file = f"{plan.name}.geojson.gz" if opts.gzip else f"{plan.name}.geojson"
        writer = GeoJSONWriter(
            ctx.partial / self.file, classes=plan.tissue_classes, scale=plan.scale,
            object_type=opts.objects, gzip=opts.gzip, mpp=ctx.slide.mpp,
            chunk_shape=(plan.grid.chunk, plan.grid.chunk),
            label_shape=(plan.grid.height, plan.grid.width), rows_in_order=True)
        keys = [c.key for c in plan.chunks if plan.has_tissue(c)]
        self._local = threading.local()
        self.stream = _TraceStream(writer, self.traces, keys)

    def _trace_path(self, key: str) -> Path:
        return self.traces / f"{key}.npz"

    def has(self, chunk) -> bool:
        return not self.ctx.plan.has_tissue(chunk) or trace_readable(self._trace_path(chunk.key))

    def start(self, done: set[str]) -> None:
        for key in done:
            self.stream.ready(key)

    def write(self, out: ChunkOutput) -> None:
        from wsiproto.export.geojson import trace_block

        c = out.chunk
        if out.labels is None:
            return
        scratch = self._local.__dict__.setdefault("scratch", {})
        traced = trace_block(out.labels, c.y0, c.x0, self.stream.writer.formatter,
                             scratch=scratch)
        traced.save(self._trace_path(c.key))
        self.stream.ready(c.key)

    def check(self) -> None:
        if self.stream.error is not None:
            raise RuntimeError(f"GeoJSON export failed: {self.stream.error}") from self.stream.error

    def finish(self, totals: Totals) -> dict:
        stats = self.stream.finish()
        return {"files": [self.file], "geojson": self.file, "features": stats["features"],
                "geojson_busy_s": round(self.stream.busy_s, 3)}

    def abort(self) -> None:
        self.stream.abort()


class _TraceStream:
    """A thread adding saved traces to the writer in the order of ``keys`` as they become
    ready (see the module doc)."""

    def __init__(self, writer, trace_dir: Path, keys: list[str]):
        self.writer, self.trace_dir, self.keys = writer, trace_dir, keys
        self.busy_s = 0.0
        self.error: BaseException | None = None
        self._ready: set[str] = set()
        self._cond = threading.Condition()
        self._stop = False
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
                self.writer.add_trace(BlockTrace.load(self.trace_dir / f"{key}.npz"))
                self.busy_s += time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - handed to finish() / check()
            self.error = exc

    def finish(self) -> dict:
        """Wait for the last chunks, close the writer (the file takes its name); its stats."""
        self._thread.join()
        if self.error is not None:
            self.writer.abort()
            raise self.error
        if self._stop:
            raise RuntimeError("the GeoJSON stream was stopped before all chunks were added")
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
