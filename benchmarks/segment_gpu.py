"""`wsiproto segment` on a GPU against the model alone: every stage's rate, memory, efficiency.

    python benchmarks/segment_gpu.py [--preset dualproto-vitb16 | --model DIR]
        [--sizes 16384 32768] [--batch-size 256] [--device cuda] [--precision auto]

Prints, for the first size:

1. the model's forward rate: batches of ``--batch-size`` random tiles already on the device
   (bf16 autocast on a GPU), what the GPU can do;
2. the predictor's rate through :class:`~wsiproto.segment.infer.BatchRunner`: uint8 tiles from
   host memory, staged and uploaded, scores left on the device;
3. the decode rate: the chunks of the slide read by as many threads as the engine uses
   (``read_threads``), in tiles/s of the global tile grid;
4. end to end: ``segment_slide`` with every output, tiles/s;

then for every size: peak GPU memory (``torch.cuda.max_memory_allocated``) and the process's
peak RSS, which must not grow with the slide. Last line: ``gpu_efficiency=<end to end /
model forward>``. Synthetic slides (0.5 um/px, JPEG pyramids, tissue over most of it) are
written once into ``--workdir``. Runs on a CPU too (``--device cpu``, small ``--sizes``), as a
check of the script itself.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
from common import model_folder, synthetic_slide, work_folder


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(predictor, batch: int, seconds: float) -> float:
    """Tiles/s of the model alone, inputs already on the device."""
    import torch

    t = predictor.tile_size
    x = torch.randint(0, 255, (batch, t, t, 3), dtype=torch.uint8, device=predictor.device)
    predictor.predict_scores(x)  # warm-up
    sync(predictor.device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        predictor.predict_scores(x)
        n += batch
    sync(predictor.device)
    return n / (time.perf_counter() - t0)


def predictor_rate(predictor, batch: int, seconds: float) -> float:
    """Tiles/s through the BatchRunner from host uint8 tiles (staging, upload, model)."""
    from wsiproto.segment.infer import BatchRunner

    t = predictor.tile_size
    tiles = np.random.default_rng(0).integers(0, 255, (batch, t, t, 3), dtype=np.uint8)
    with BatchRunner(predictor, batch_size=batch) as runner:
        runner.run(tiles)
        sync(predictor.device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pending = [runner.submit(tiles) for _ in range(4)]
            for p in pending:
                p.result()
            n += 4 * batch
        sync(predictor.device)
        return n / (time.perf_counter() - t0)


def decode_rate(slide_path, predictor, opts) -> tuple[float, int]:
    """Tiles/s of reading every tissue chunk (with the engine's reader count), and that count."""
    from concurrent.futures import ThreadPoolExecutor

    from wsiproto.segment.plan import make_plan
    from wsiproto.segment.read import SlidePool, read_chunk, read_threads
    from wsiproto.slide import Slide, detect_tissue

    with Slide(slide_path) as slide:
        plan = make_plan(slide, predictor, opts, "bench")
        plan.add_tissue(detect_tissue(slide))
        threads = read_threads(slide.backend, predictor.device.type == "cuda")
        pool = SlidePool(slide)
        chunks = [c for c in plan.chunks if plan.has_tissue(c)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            tiles = sum(len(inp.positions) for inp in
                        ex.map(lambda c: read_chunk(plan, pool, c, False), chunks))
        rate = tiles / (time.perf_counter() - t0)
        pool.close()
    return rate, threads


class PeakRSS:
    """The process's resident memory, sampled every 50 ms (ru_maxrss never goes down)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.05):
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * page)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def end_to_end(slide_path, predictor, opts) -> dict:
    import torch

    from wsiproto.segment import segment_slide

    if predictor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(predictor.device)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = segment_slide(slide_path, predictor, opts).summary
        wall = time.perf_counter() - t0
    gpu = (torch.cuda.max_memory_allocated(predictor.device) / 2**20
           if predictor.device.type == "cuda" else float("nan"))
    tiles = summary["tiles"]["run_now"]
    return {"tiles": tiles, "wall_s": wall, "rate": tiles / wall, "gpu_mb": gpu,
            "rss_mb": rss.peak / 2**20, "timings": summary["timings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="dualproto-vitb16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="chunks in inference (engine)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per rate measurement")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from wsiproto.segment import runtime

    with runtime() as rt:
        run(args, rt)


def run(args, rt) -> None:
    import torch

    from wsiproto.segment import SegmentOptions
    from wsiproto.segment.predictor import load_predictor

    work = work_folder(args.workdir, "wsiproto-gpu-")
    model_dir = model_folder(args.model, args.preset, work)
    predictor = load_predictor(model_dir, device=args.device, precision=args.precision)
    rt.freeze()
    dev = predictor.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{predictor.config.preset} {predictor.precision}, batch {args.batch_size}")

    fwd = forward_rate(predictor, args.batch_size, args.seconds)
    print(f"model forward      {fwd:9.1f} tiles/s  (inputs on the device)")
    pred = predictor_rate(predictor, args.batch_size, args.seconds)
    print(f"predictor          {pred:9.1f} tiles/s  (host uint8 -> staging -> device scores)")

    first = None
    for size in args.sizes:
        slide = synthetic_slide(work, size, mpp=predictor.mpp, levels=4, seed=7)
        opts = SegmentOptions(out=work / "out", batch_size=args.batch_size, quiet=True,
                              overwrite=True, workers=args.workers)
        if first is None:
            rate, threads = decode_rate(slide, predictor, opts)
            print(f"decode             {rate:9.1f} tiles/s  ({threads} reading threads)")
        res = end_to_end(slide, predictor, opts)
        first = first or res
        gpu = "n/a (no GPU)" if res["gpu_mb"] != res["gpu_mb"] else f"{res['gpu_mb']:.0f} MB"
        print(f"end to end {size:>6}^2 {res['rate']:9.1f} tiles/s  ({res['tiles']} tiles in "
              f"{res['wall_s']:.1f} s; peak GPU {gpu}, peak RSS {res['rss_mb']:.0f} MB)")
        print(f"  stages: {res['timings']}")
    print(f"gpu_efficiency={first['rate'] / fwd:.3f}")


if __name__ == "__main__":
    main()
