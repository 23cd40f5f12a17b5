"""Inference and blending, on the model's device: tiles go in as uint8, labels come out.

A :class:`TilePredictor` maps uint8 tiles ``[N, t, t, 3]`` (a torch tensor on its ``device``)
to per-class scores ``[N, K + 1, t, t]`` on that device (K tissue classes, then background;
higher = more likely). The scores never leave the device:

* :class:`BatchRunner` owns the predictor and one thread. It gathers tiles from every chunk in
  flight into full batches, copies them into a reused staging buffer (pinned host memory on a
  GPU, uploaded on a side CUDA stream while the previous batch computes) and runs the model
  on exactly ``batch_size`` tiles every time, padding a short batch with blank tiles: the
  kernels pick algorithms and reduction orders by input shape, so one shape makes a tile's
  scores independent of the batch it ran in and of the CPU thread count (bitwise; tested).
* :class:`ChunkCanvas` is a chunk's accumulator on the same device: each tile's scores are
  weighted by the blending window and summed in as they come out of the model (in the chunk's
  fixed tile order, so the sums are the same whatever the batches were); at the end the
  argmax runs there too and only uint8 labels (and uint8 probabilities on request) are
  copied to the host, once per chunk.

On a CPU the same code runs with CPU tensors: staging is a plain reused array and the canvas
a pair of float32 tensors.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wsiproto.segment.grid import blend_window


class TilePredictor(Protocol):
    tile_size: int
    mpp: float
    num_classes: int  # K tissue classes; scores have K + 1 channels (background last)
    # ``device`` (a torch.device or string), when absent: "cpu"

    def predict_scores(self, tiles):
        """uint8 tensor [N, t, t, 3] on the predictor's device -> float tensor
        [N, K + 1, t, t] on that device, which the caller may overwrite."""


def predictor_device(predictor):
    import torch

    return torch.device(getattr(predictor, "device", "cpu"))


# --------------------------------------------------------------------------------------------
# Batches


@dataclass
class _Request:
    tiles: np.ndarray
    parts: list = field(default_factory=list)  # (start, scores) pieces, in order
    filled: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Pending:
    """Scores of tiles queued with :meth:`BatchRunner.submit`."""

    def __init__(self, req: _Request, ended: threading.Event):
        self._req, self._ended = req, ended

    def result(self):
        """The scores (a tensor on the model's device), in the order of the tiles."""
        import torch

        req = self._req
        # Wake up if the runner is closed meanwhile (an interrupt): never wait forever.
        while not req.done.wait(0.25):
            if self._ended.is_set() and not req.done.is_set():
                raise RuntimeError("the batch runner was closed before these tiles ran")
        if req.error is not None:
            raise req.error
        parts, req.parts = req.parts, []
        return parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])


class _Staging:
    """Reused host buffers for batches on their way to the model: ``slots`` of them, pinned on
    a GPU, each with a device twin that a side stream fills while the model computes on the
    other. Never allocated again after start-up (``allocations`` counts, for tests)."""

    def __init__(self, shape: tuple[int, ...], device, slots: int = 2):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        n = slots if self.cuda else 1
        self.host = [torch.zeros(shape, dtype=torch.uint8, pin_memory=self.cuda)
                     for _ in range(n)]
        self.allocations = n
        self.filled = [0] * n  # rows holding tiles of the last batch (the rest are zero)
        self._next = 0
        if self.cuda:
            self.dev = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(n)]
            self.stream = torch.cuda.Stream(device=device)
            self.copied = [torch.cuda.Event() for _ in range(n)]
            self.consumed = [torch.cuda.Event() for _ in range(n)]

    def take(self) -> int:
        """The next slot, once its previous upload has finished (its buffer is free)."""
        j = self._next
        self._next = (j + 1) % len(self.host)
        if self.cuda:
            self.copied[j].synchronize()
        return j

    def fill(self, j: int, pieces: list[np.ndarray]) -> int:
        """Copy the batch's tiles into slot ``j``; rows beyond them are zero. Returns n."""
        import torch

        buf = self.host[j]
        n = 0
        for piece in pieces:
            buf[n : n + len(piece)].copy_(torch.from_numpy(piece))
            n += len(piece)
        if self.filled[j] > n:
            buf[n : self.filled[j]].zero_()
        self.filled[j] = n
        return n

    def upload(self, j: int):
        """Slot ``j`` on the model's device (on a GPU: copied on the side stream; the current
        stream waits for the copy, and the next copy into this slot for the model)."""
        import torch

        if not self.cuda:
            return self.host[j]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.consumed[j])
            self.dev[j].copy_(self.host[j], non_blocking=True)
            self.copied[j].record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[j])
        return self.dev[j]

    def release(self, j: int) -> None:
        """The model's work on slot ``j`` is queued: later copies into it wait for it."""
        if self.cuda:
            self.consumed[j].record()


class BatchRunner:
    """Runs ``predictor`` on batches of exactly ``batch_size`` tiles gathered across callers.

    ``submit(tiles)`` is thread-safe and returns at once; ``.result()`` waits for the scores.
    The worker waits ``gather_s`` for more tiles when a batch is not full, so that tiles of
    several chunks share a batch. Counters (``tiles``, ``batches``, ``busy_s``) measure what
    the model did (``busy_s``: wall time in the predictor's call; on a GPU the launches).
    """

    def __init__(self, predictor: TilePredictor, batch_size: int = 32, gather_s: float = 0.005):
        self.predictor = predictor
        self.batch_size = max(1, int(batch_size))
        self.gather_s = gather_s
        self.device = predictor_device(predictor)
        t = int(predictor.tile_size)
        self.staging = _Staging((self.batch_size, t, t, 3), self.device)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ended = threading.Event()
        self.tiles = 0
        self.batches = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="wsiproto-infer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, tiles: np.ndarray):
        """Scores of ``tiles`` (blocks until they ran)."""
        return self.submit(tiles).result()

    def submit(self, tiles: np.ndarray) -> Pending:
        """Queue uint8 ``tiles`` [n, t, t, 3] and return at once."""
        req = _Request(tiles=tiles)
        if len(tiles) == 0:
            import torch

            t = self.predictor.tile_size
            req.parts = [(0, torch.zeros((0, self.predictor.num_classes + 1, t, t),
                                         device=self.device))]
            req.done.set()
        else:
            self._queue.put(req)
        return Pending(req, self._ended)

    # The worker: pieces of requests are packed into batches; a request may span batches.
    def _loop(self) -> None:
        pending: list[list] = []  # [request, next tile index]
        try:
            self._serve_batches(pending)
        finally:
            self._fail_leftovers(pending)
            self._ended.set()

    def _serve_batches(self, pending: list[list]) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1) if not pending else self._queue.get_nowait()
            except queue.Empty:
                item = None
            if item is not None:
                pending.append([item, 0])
            if not pending:
                continue
            if sum(len(r.tiles) - i for r, i in pending) < self.batch_size:
                try:  # wait briefly for other chunks' tiles to fill the batch
                    more = self._queue.get(timeout=self.gather_s)
                    if more is not None:
                        pending.append([more, 0])
                        continue
                except queue.Empty:
                    pass
            self._run_batch(pending)
            pending[:] = [p for p in pending if not p[0].done.is_set()]

    def _take_parts(self, pending: list[list]) -> list[tuple[_Request, int, int]]:
        parts, room = [], self.batch_size
        for entry in pending:
            req, start = entry
            n = min(room, len(req.tiles) - start)
            if n <= 0:
                continue
            parts.append((req, start, n))
            entry[1] = start + n
            room -= n
            if room == 0:
                break
        return parts

    def _run_batch(self, pending: list[list]) -> None:
        import torch

        parts = self._take_parts(pending)
        t0 = time.perf_counter()
        try:
            j = self.staging.take()
            n = self.staging.fill(j, [r.tiles[s : s + k] for r, s, k in parts])
            with torch.inference_mode():
                scores = self.predictor.predict_scores(self.staging.upload(j))
            self.staging.release(j)
        except BaseException as exc:  # hand the error to every caller in this batch
            for req, _, _ in parts:
                req.error = exc
                req.done.set()
            return
        self.busy_s += time.perf_counter() - t0
        self.tiles += n
        self.batches += 1
        offset = 0
        for req, start, k in parts:
            req.parts.append((start, scores[offset : offset + k]))
            offset += k
            req.filled += k
            if req.filled == len(req.tiles):
                req.done.set()

    def _fail_leftovers(self, pending: list[list]) -> None:
        """Closed: fail what is still waiting so that its callers return."""
        closed = RuntimeError("the batch runner was closed before these tiles ran")
        leftovers = [r for r, _ in pending]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftovers.append(item)
        for req in leftovers:
            if not req.done.is_set():
                req.error = closed
                req.done.set()


# --------------------------------------------------------------------------------------------
# Blending


class CanvasPool:
    """Accumulator buffers on one device, reused from chunk to chunk (a fresh 80 MB buffer per
    chunk costs page faults on every first write, more than clearing a used one). At most
    ``limit`` exist: a chunk that asks for one more waits until a blend ends (on a CPU, the
    blending threads run at the lowest priority beside the model and can fall behind it; each
    canvas is ~100 MB at the default chunk size, and the scores waiting for a blend 32 MB a
    batch of 32)."""

    def __init__(self, device, channels: int, size: int, tile: int, overlap: int,
                 limit: int = 2):
        import torch

        self.device, self.channels, self.size = device, channels, size
        self.window = torch.from_numpy(blend_window(tile, overlap)).to(device)
        self.tile, self.overlap = tile, overlap
        self._free: list = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limit)
        self.allocations = 0

    def canvas(self, y0: int, x0: int, height: int, width: int) -> ChunkCanvas:
        self._slots.acquire()
        try:
            return self._canvas(y0, x0, height, width)
        except BaseException:
            self._slots.release()
            raise

    def _canvas(self, y0: int, x0: int, height: int, width: int) -> ChunkCanvas:
        import torch

        with self._lock:
            bufs = self._free.pop() if self._free else None
        if bufs is None:
            side = max(self.size, height, width)
            bufs = (torch.empty((self.channels, side, side), dtype=torch.float32,
                                device=self.device),
                    torch.empty((side, side), dtype=torch.float32, device=self.device))
            self.allocations += 1
        return ChunkCanvas(self, bufs, y0, x0, height, width)

    def give_back(self, bufs) -> None:
        with self._lock:
            self._free.append(bufs)
        self._slots.release()


class ChunkCanvas:
    """The blend of one chunk on the model's device: sum of window x scores [K+1, h, w] and sum
    of windows [h, w] (see module doc). Use as a context manager: the buffers go back to the
    pool at the end."""

    def __init__(self, pool: CanvasPool, bufs, y0: int, x0: int, height: int, width: int):
        self._pool, self._bufs = pool, bufs
        self.y0, self.x0, self.h, self.w = y0, x0, height, width
        self.acc = bufs[0][:, :height, :width]
        self.wsum = bufs[1][:height, :width]
        self.acc.zero_()
        self.wsum.zero_()

    def __enter__(self) -> ChunkCanvas:
        return self

    def __exit__(self, *exc) -> None:
        if self._bufs is not None:
            self._pool.give_back(self._bufs)
            self._bufs = None

    def add(self, scores, positions: list[tuple[int, int]]) -> None:
        """Blend tiles: ``scores`` [n, K+1, t, t] (overwritten) at label-frame ``positions``.
        Multiply, then add, in float32: the same roundings wherever it runs."""
        import torch

        with torch.inference_mode():  # the scores are inference tensors
            self._add(scores, positions)

    def _add(self, scores, positions) -> None:
        t, win = self._pool.tile, self._pool.window
        for i, (ty, tx) in enumerate(positions):
            y0, x0 = ty - self.y0, tx - self.x0
            cy0, cx0 = max(y0, 0), max(x0, 0)
            cy1, cx1 = min(y0 + t, self.h), min(x0 + t, self.w)
            if cy1 <= cy0 or cx1 <= cx0:
                continue
            sy, sx = slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)
            part = scores[i, :, sy, sx].float()
            wt = win[sy, sx]
            part.mul_(wt)
            self.acc[:, cy0:cy1, cx0:cx1].add_(part)
            self.wsum[cy0:cy1, cx0:cx1].add_(wt)

    def labels(self, probabilities: bool = False):
        """uint8 labels [h, w] on the host: 1 + the argmax over classes and background (ties
        to the first), 0 where no tile reached; and uint8 probabilities [K+1, h, w] (each
        channel's share of the blended scores x 255, rounded) when asked, else None."""
        import torch

        with torch.inference_mode():
            return self._labels(probabilities)

    def _labels(self, probabilities: bool):
        import torch

        covered = self.wsum > 0
        if self.acc.device.type == "cpu":  # numpy on the same memory: 3-10x faster here
            labels = argmax_planes(self.acc.numpy())
            labels += np.uint8(1)
            labels *= covered.numpy()
        else:
            labels = argmax_planes(self.acc).add_(1).mul_(covered).cpu().numpy()
        probs = None
        if probabilities:  # every channel, background included, as the store holds them
            p = self.acc / self.wsum.clamp_min(1e-12)
            p /= p.sum(0, keepdim=True).clamp_min(1e-12)
            probs = p.mul_(255).round_().mul_(covered).to(torch.uint8).cpu().numpy()
        return labels, probs


def argmax_planes(acc):
    """The index of the largest of the planes of ``acc`` [C, h, w] as uint8 [h, w], ties to the
    first (as argmax), one contiguous plane at a time (the reduction over the first axis is
    several times slower): plane k wins where it beats the best so far and k grows, so the
    index is a running maximum of ``k * (plane k wins)``, with no masked writes. Works on a
    numpy array or a torch tensor (on its device)."""
    if isinstance(acc, np.ndarray):
        shape = acc.shape[1:]
        best, wins = acc[0].copy(), np.empty(shape, bool)
        idx, k_wins = np.zeros(shape, np.uint8), np.empty(shape, np.uint8)
        for k in range(1, acc.shape[0]):
            np.greater(acc[k], best, out=wins)
            np.multiply(wins.view(np.uint8), np.uint8(k), out=k_wins)
            np.maximum(idx, k_wins, out=idx)
            np.maximum(best, acc[k], out=best)
        return idx
    import torch

    best = acc[0].clone()
    idx = torch.zeros(acc.shape[1:], dtype=torch.uint8, device=acc.device)
    wins = torch.empty(acc.shape[1:], dtype=torch.bool, device=acc.device)
    for k in range(1, acc.shape[0]):
        torch.gt(acc[k], best, out=wins)
        torch.maximum(idx, wins.view(torch.uint8) * k, out=idx)
        torch.maximum(best, acc[k], out=best)
    return idx


def infer_chunk(runner: BatchRunner, canvases: CanvasPool, inp, group: int,
                probabilities: bool = False, in_flight: int = 2, submitted=None, clock=None):
    """A chunk's uint8 labels (and probabilities when asked; see :meth:`ChunkCanvas.labels`):
    its tiles run through ``runner`` group by group and are blended on a canvas from
    ``canvases`` as they come out. The first groups are queued before a canvas is taken (the
    model computes them while an earlier chunk still blends its last scores on the canvas it
    holds), the next ones before the last one is blended, so the model always has work. The
    scores of a whole chunk never exist at once. ``submitted()`` is called once the last
    group is queued (the next chunk may then queue its tiles, which fill the batch this
    chunk's last group leaves short); ``clock(name, seconds)`` gets the thread time spent
    blending (``blend_s``) and taking the argmax (``labels_s``)."""
    t = runner.predictor.tile_size
    groups = [inp.positions[g : g + group] for g in range(0, len(inp.positions), group)]
    queued = deque((g, runner.submit(inp.tiles(g, t))) for g in groups[:in_flight])
    nxt = len(queued)
    if nxt == len(groups) and submitted is not None:
        submitted()
    c = inp.chunk
    with canvases.canvas(c.y0, c.x0, c.height, c.width) as canvas:
        t0 = time.thread_time()
        while queued:
            positions, pending = queued.popleft()
            scores = pending.result()
            if nxt < len(groups):
                queued.append((groups[nxt], runner.submit(inp.tiles(groups[nxt], t))))
                nxt += 1
                if nxt == len(groups) and submitted is not None:
                    submitted()
            canvas.add(scores, positions)
            del scores
        t1 = time.thread_time()
        labels, probs = canvas.labels(probabilities)
    if clock is not None:
        clock("blend_s", t1 - t0)
        clock("labels_s", time.thread_time() - t1)
    return labels, probs


__all__ = ["BatchRunner", "CanvasPool", "ChunkCanvas", "Pending", "TilePredictor",
           "argmax_planes", "infer_chunk", "predictor_device"]
