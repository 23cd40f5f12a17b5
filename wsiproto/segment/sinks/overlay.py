"""``overlay``: ``overlay.png``, a thumbnail of the slide with the class map blended over it
and a legend with each class's share of the tissue: the first thing to open.

Each chunk keeps its share of a small label map (every ``f``-th label pixel, ``f`` the
downsample that brings the label frame under 1024 px like the pyramid's top level), saved under
``.partial/overlay`` so that a resumed run has it; the slide's thumbnail is read on a side
thread meanwhile."""

from __future__ import annotations

import threading
import time

import numpy as np

from wsiproto.segment.sinks import ChunkOutput, Sink, SinkContext, Totals, register
from wsiproto.segment.threads import lower_thread_priority


def _samples(start: int, length: int, f: int, limit: int) -> tuple[int, np.ndarray]:
    """(first index, local offsets) of the small map's pixels r (centre r*f + f//2) that fall
    in [start, start + length)."""
    first = max(0, -(-(start - f // 2) // f))
    last = min(limit, (start + length - 1 - f // 2) // f + 1)
    return first, np.arange(first, max(first, last)) * f + f // 2 - start


@register("overlay")
class OverlaySink(Sink):
    def __init__(self, ctx: SinkContext):
        from wsiproto.export.ngff import level_shapes

        super().__init__(ctx)
        grid = ctx.plan.grid
        shapes = level_shapes(grid.height, grid.width)
        self.shape, self.f = shapes[-1], 1 << (len(shapes) - 1)
        self.pieces = ctx.partial / "overlay"
        self.pieces.mkdir(exist_ok=True)
        self._thumb: dict = {}
        self._thread = threading.Thread(target=self._read_thumbnail, daemon=True,
                                        name="wsiproto-thumbnail")
        self._thread.start()

    def _read_thumbnail(self) -> None:
        lower_thread_priority()
        t0 = time.perf_counter()
        try:
            self._thumb["rgb"], _ = self.ctx.slide.thumbnail(max_size=max(self.shape))
        except BaseException as exc:  # noqa: BLE001 - raised by finish()
            self._thumb["error"] = exc
        self._thumb["seconds"] = time.perf_counter() - t0

    def _piece(self, key: str):
        return self.pieces / f"{key}.npz"

    def has(self, chunk) -> bool:
        if not self.ctx.plan.has_tissue(chunk):
            return True
        try:
            with np.load(self._piece(chunk.key)) as z:
                return "labels" in z.files
        except Exception:  # noqa: BLE001 - missing or damaged: redo the chunk
            return False

    def write(self, out: ChunkOutput) -> None:
        import os

        if out.labels is None:
            return
        c = out.chunk
        r0, ys = _samples(c.y0, c.height, self.f, self.shape[0])
        c0, xs = _samples(c.x0, c.width, self.f, self.shape[1])
        path = self._piece(c.key)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, labels=out.labels[np.ix_(ys, xs)], origin=np.array([r0, c0]))
        os.replace(tmp, path)

    def finish(self, totals: Totals) -> dict:
        from wsiproto.export.report import overlay_image, save_png_atomic

        t0 = time.perf_counter()
        small = np.zeros(self.shape, np.uint8)
        for chunk in self.ctx.plan.chunks:
            if self.ctx.plan.has_tissue(chunk):
                with np.load(self._piece(chunk.key)) as z:
                    r0, c0 = (int(v) for v in z["origin"])
                    part = z["labels"]
                small[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part
        self._thread.join()
        if "error" in self._thumb:
            raise self._thumb["error"]
        classes = self.ctx.plan.classes
        img = overlay_image(self._thumb["rgb"], small, classes, title=self.ctx.plan.name,
                            areas=totals.percent_of_tissue,
                            uncoloured=(classes[-1][0],))  # background: the slide as it is
        save_png_atomic(self.ctx.partial / "overlay.png", img)
        seconds = self._thumb["seconds"] + time.perf_counter() - t0
        return {"files": ["overlay.png"], "overlay": "overlay.png", "overlay_s": round(seconds, 3)}

    def abort(self) -> None:
        self._thread.join()
