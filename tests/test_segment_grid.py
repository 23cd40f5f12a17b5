"""Chunk grid, global tile grid, blending weights and the batch runner."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from reference_blend import blend_tiles, labels_of
from wsiproto.segment.grid import ChunkGrid, blend_window
from wsiproto.segment.infer import BatchRunner, CanvasPool


@pytest.mark.parametrize("h,w,chunk,tile,overlap", [
    (1000, 1300, 512, 128, 32), (513, 511, 512, 224, 56), (100, 90, 512, 224, 0),
    (4096, 2048, 1024, 224, 32),
])
def test_tiles_cover_every_pixel_and_chunks_agree(h, w, chunk, tile, overlap):
    grid = ChunkGrid(h, w, chunk, tile, overlap)
    cover = np.zeros((h, w), np.int32)
    every = set()
    for c in grid.chunks():
        pos = grid.tiles_for(c)
        every.update(pos)
        local = np.zeros((c.height, c.width), np.int32)
        for ty, tx in pos:
            y0, x0 = max(ty - c.y0, 0), max(tx - c.x0, 0)
            y1, x1 = min(ty + tile - c.y0, c.height), min(tx + tile - c.x0, c.width)
            assert y1 > y0 and x1 > x0, "a listed tile must meet its chunk"
            local[y0:y1, x0:x1] += 1
        cover[c.y0 : c.y0 + c.height, c.x0 : c.x0 + c.width] = local
    assert cover.min() >= 1
    # The chunks' tiles are exactly the global grid: same positions whatever the chunking.
    assert len(every) == grid.total_tiles()
    whole = ChunkGrid(h, w, max(h, w) + chunk, tile, overlap)
    assert set(whole.tiles_for(next(whole.chunks()))) == every


def test_blend_window_and_blending_is_chunk_independent():
    win = blend_window(64, 16)
    assert win.min() > 0 and win.max() == 1.0 and np.allclose(win, win.T)
    grid = ChunkGrid(300, 300, 128, 64, 16)
    rng = np.random.default_rng(0)
    all_pos = sorted({p for c in grid.chunks() for p in grid.tiles_for(c)})
    scores = {p: rng.random((3, 64, 64), dtype=np.float32) for p in all_pos}
    acc_all, w_all = blend_tiles(np.stack([scores[p] for p in all_pos]), all_pos, (0, 0),
                                 (300, 300), 16)
    for c in grid.chunks():
        pos = grid.tiles_for(c)
        acc, w = blend_tiles(np.stack([scores[p] for p in pos]), pos, (c.y0, c.x0),
                             (c.height, c.width), 16)
        sl = (slice(c.y0, c.y0 + c.height), slice(c.x0, c.x0 + c.width))
        np.testing.assert_allclose(acc, acc_all[(slice(None),) + sl], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(w, w_all[sl], rtol=1e-6)


def _near_ties(rng, n: int, t: int) -> np.ndarray:
    """Scores whose top two channels are often exactly equal or a float step apart."""
    base = rng.integers(0, 4, (n, 3, t, t)).astype(np.float32) / 4
    base[:, 1] = np.where(rng.random((n, t, t)) < 0.5, base[:, 0],
                          np.nextafter(base[:, 0], np.float32(1)))
    return base


@pytest.mark.parametrize("group", [1, 5, 64])
def test_device_canvas_equals_the_numpy_blend_exactly(group):
    """The canvas (torch, here on the CPU) gives bit-identical sums and labels to the numpy
    path it replaced, fed in groups of any size, near-ties included."""
    import torch

    grid = ChunkGrid(300, 260, 128, 64, 16)
    rng = np.random.default_rng(1)
    pool = CanvasPool(torch.device("cpu"), 3, grid.chunk, grid.tile, grid.overlap)
    for c in grid.chunks():
        pos = grid.tiles_for(c)
        scores = _near_ties(rng, len(pos), 64)
        ref_acc, ref_w = blend_tiles(scores, pos, (c.y0, c.x0), (c.height, c.width), 16)
        with pool.canvas(c.y0, c.x0, c.height, c.width) as canvas:
            for g in range(0, len(pos), group):
                canvas.add(torch.from_numpy(scores[g : g + group].copy()), pos[g : g + group])
            np.testing.assert_array_equal(canvas.acc.numpy(), ref_acc)
            np.testing.assert_array_equal(canvas.wsum.numpy(), ref_w)
            labels, probs = canvas.labels(probabilities=True)
        np.testing.assert_array_equal(labels, labels_of(ref_acc, ref_w))
        assert probs.shape == (3, c.height, c.width) and probs.dtype == np.uint8
    assert pool.allocations == 1  # one buffer, reused chunk after chunk


class _Echo:
    tile_size, mpp, num_classes = 8, 1.0, 1

    def __init__(self):
        self.batch_sizes = []

    def predict_scores(self, tiles):
        import torch

        self.batch_sizes.append(len(tiles))
        self.last_max = tiles.amax(dim=(1, 2, 3))  # per row: padding rows must be blank
        v = tiles[..., 0].float()[:, None]
        return torch.cat([v, -v], dim=1)


def test_batch_runner_batches_across_callers_and_returns_each_its_own():
    pred = _Echo()
    results = {}
    with BatchRunner(pred, batch_size=16, gather_s=0.05) as runner:
        def call(i):
            tiles = np.full((5 + i, 8, 8, 3), i, np.uint8)
            results[i] = runner.run(tiles)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(6):
        out = results[i]
        assert out.shape == (5 + i, 2, 8, 8)
        assert (out[:, 0] == i).all() and (out[:, 1] == -i).all()
    assert set(pred.batch_sizes) == {16}  # one shape; tiles of several callers shared a batch
    assert runner.tiles == sum(5 + i for i in range(6))
    assert runner.batches == len(pred.batch_sizes) < 6


def test_short_batches_are_padded_to_the_one_batch_shape():
    """The model sees one batch shape only (scores then do not depend on the batch a tile ran
    in): 27 tiles with batch size 16 run as 16, then 11 padded to 16; the scores come back in
    tile order and the padding never reaches a caller."""
    pred = _Echo()
    tiles = np.arange(1, 28, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    with BatchRunner(pred, batch_size=16, gather_s=0.0) as runner:
        out = runner.run(tiles)
        again = runner.run(tiles[:3])
    assert pred.batch_sizes == [16, 16, 16]
    np.testing.assert_array_equal(out[:, 0, 0, 0], np.arange(1, 28))
    np.testing.assert_array_equal(again[:, 0, 0, 0], np.arange(1, 4))
    assert runner.tiles == 30 and runner.batches == 3


def test_batch_runner_passes_errors_to_the_caller():
    class Broken(_Echo):
        def predict_scores(self, tiles):
            raise RuntimeError("boom")

    with BatchRunner(Broken(), batch_size=4) as runner:
        with pytest.raises(RuntimeError, match="boom"):
            runner.run(np.zeros((3, 8, 8, 3), np.uint8))


def test_closing_the_runner_releases_waiting_callers():
    """An interrupt closes the runner while chunk threads wait: they must return, not hang."""
    import time

    class Slow(_Echo):
        def predict_scores(self, tiles):
            time.sleep(0.3)
            return super().predict_scores(tiles)

    runner = BatchRunner(Slow(), batch_size=2)
    errors = []

    def call():
        try:
            runner.run(np.zeros((6, 8, 8, 3), np.uint8))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    runner.close()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
    assert errors and "closed" in str(errors[0])


def test_staging_buffers_are_reused_and_host_memory_stays_flat():
    """Batches go through one staging buffer allocated at start-up (pinned on a GPU; the same
    code path here): over many batches of every size its storage never changes, and the
    process's memory does not grow with the number of batches."""
    import resource

    pred = _Echo()
    pred.tile_size = 64
    rng = np.random.default_rng(3)
    with BatchRunner(pred, batch_size=8, gather_s=0.0) as runner:
        buffers = [b.data_ptr() for b in runner.staging.host]
        for n in (8, 3, 8, 1, 5):  # warm up every path (full, padded, re-zeroed)
            runner.run(rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8))
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(400):
            n = 1 + i % 11
            tiles = np.full((n, 64, 64, 3), i % 200, np.uint8)
            out = runner.run(tiles)
            assert out.shape == (n, 2, 64, 64) and float(out[0, 0, 0, 0]) == i % 200
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
        assert [b.data_ptr() for b in runner.staging.host] == buffers
        assert runner.staging.allocations == len(buffers)
        assert runner.tiles == sum(1 + i % 11 for i in range(400)) + 25
    assert grown_kb < 20_000, f"peak RSS grew by {grown_kb} kB over 400 batches"
    assert set(pred.batch_sizes) == {8}
    # the padding of a short batch is blank, not the tiles of the batch before it
    with BatchRunner(pred, batch_size=8, gather_s=0.0) as runner:
        runner.run(np.full((8, 64, 64, 3), 255, np.uint8))
        runner.run(np.full((2, 64, 64, 3), 7, np.uint8))
    assert pred.last_max.tolist() == [7, 7, 0, 0, 0, 0, 0, 0]


def test_argmax_planes_ties_to_the_first_on_numpy_and_torch():
    import torch

    from wsiproto.segment.infer import argmax_planes

    rng = np.random.default_rng(2)
    acc = rng.integers(0, 3, (5, 64, 80)).astype(np.float32)  # many exact ties
    ref = np.argmax(acc, axis=0).astype(np.uint8)
    np.testing.assert_array_equal(argmax_planes(acc), ref)
    np.testing.assert_array_equal(argmax_planes(torch.from_numpy(acc)).numpy(), ref)


def test_canvas_pool_holds_at_most_its_limit_and_the_next_chunk_waits():
    """A chunk asking for a canvas beyond the pool's limit waits until a blend gives one back
    (memory bounded by the chunks in inference, not by how far the blending threads lag)."""
    import torch

    pool = CanvasPool(torch.device("cpu"), 3, 64, 16, 4, limit=2)
    first, second = pool.canvas(0, 0, 64, 64), pool.canvas(0, 64, 64, 64)
    got = threading.Event()

    def third():
        with pool.canvas(64, 0, 64, 64):
            got.set()

    t = threading.Thread(target=third)
    t.start()
    assert not got.wait(0.3)  # blocked while two canvases are out
    first.__exit__(None, None, None)
    assert got.wait(5)
    t.join()
    second.__exit__(None, None, None)
    assert pool.allocations == 2  # the third chunk reused the first one's buffers
