"""Random-region read throughput of the slide reader, per backend.

    python benchmarks/slide_read.py [SLIDE] [--size 512] [--n 300] [--mpp X]

Without SLIDE it uses ../shared/data/slides/CMU-1-Small-Region.svs. Prints regions/s for each
backend through wsiproto's Slide (fill, compositing and resampling included) and through the
backend's own read_region, single thread, so the overhead of the wrapper is visible.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    default = Path(__file__).resolve().parents[1].parent / "shared/data/slides/CMU-1-Small-Region.svs"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?", default=str(default))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--mpp", type=float, default=None, help="read at this mpp (resampled)")
    args = ap.parse_args()

    from wsiproto.slide import Slide

    rng = np.random.default_rng(0)
    for backend in ("openslide", "tiffslide"):
        with Slide(args.slide, backend=backend) as s:
            w, h = s.size
            span = args.size if args.mpp is None else int(args.size * args.mpp / s.require_mpp())
            xs = rng.integers(0, max(w - span, 1), args.n)
            ys = rng.integers(0, max(h - span, 1), args.n)
            level = s.best_level(span / args.size)
            ds = s.level_downsamples[level]
            raw_size = (int(span / ds), int(span / ds))

            def ours_read(x, y):
                s.read_region((int(x), int(y)), (args.size, args.size), mpp=args.mpp)

            def raw_read(x, y):  # the registered reader itself (wsiproto.slide.backends)
                np.asarray(s.reader.read(level, int(x / ds), int(y / ds), *raw_size))

            # Interleaved, with the order alternating, so both see the same tile-cache state.
            t_ours = t_raw = 0.0
            for i, (x, y) in enumerate(zip(xs, ys)):
                pair = (ours_read, raw_read) if i % 2 else (raw_read, ours_read)
                for fn in pair:
                    t0 = time.perf_counter()
                    fn(x, y)
                    dt = time.perf_counter() - t0
                    if fn is ours_read:
                        t_ours += dt
                    else:
                        t_raw += dt
            ours, raw = args.n / t_ours, args.n / t_raw
        print(f"{backend:10s} wsiproto Slide.read_region {ours:7.1f} regions/s   "
              f"backend read_region (same level, no resampling) {raw:7.1f} regions/s   ({args.size} px, mpp={args.mpp})")


if __name__ == "__main__":
    main()
