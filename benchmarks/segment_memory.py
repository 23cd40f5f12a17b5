"""Peak memory of `wsiproto segment` on synthetic slides of growing size.

    python benchmarks/segment_memory.py [--sizes 10000 20000 40000] [--mpp 0.25] [--model DIR]

Each slide (square, ``--mpp`` um/px like a 40x scan, 3-level JPEG pyramid, H&E-like tissue on
about half of it) is written once, then segmented in a fresh process whose peak RSS
(``ru_maxrss``) is reported with the run's figures, including the GeoJSON work (tracing in
the chunk tasks, stitching and writing, what is left after the model; file size). Memory must
not grow with the slide: the last line is
``rss_growth_40k_vs_10k=<peak RSS at the largest size / peak RSS at the smallest>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import model_folder, synthetic_slide, work_folder

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from wsiproto.segment import SegmentOptions, runtime, segment_slide
from wsiproto.segment.predictor import load_predictor
slide, model, out, gzip = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
with runtime() as rt:  # as `wsiproto segment` runs
    predictor = load_predictor(model)
    rt.freeze()
    t0 = time.perf_counter()
    s = segment_slide(slide, predictor, SegmentOptions(out=out, quiet=True, overwrite=True,
                                                       gzip=gzip)).summary
    wall = time.perf_counter() - t0
geo = Path(s["outputs"]["folder"]) / s["outputs"]["geojson"]
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tiles": s["tiles"]["run_now"], "timings": s["timings"],
                  "features": sum(s["outputs"]["features"].values()),
                  "geojson_mb": geo.stat().st_size / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000])
    ap.add_argument("--mpp", type=float, default=0.25, help="slide pixel size (40x: 0.25)")
    ap.add_argument("--model", default=None, help="model folder (default: random dualproto-tiny)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--gzip", action="store_true")
    args = ap.parse_args()

    work = work_folder(args.workdir, "wsiproto-mem-")
    model = model_folder(args.model, "dualproto-tiny", work)

    peaks = {}
    for size in args.sizes:
        slide = synthetic_slide(work, size, mpp=args.mpp, levels=3, seed=3)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(model),
                               str(work / "out"), "1" if args.gzip else "0"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"segment failed on {slide}:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[size] = r["peak_rss_mb"]
        t = r["timings"]
        # GeoJSON work: tracing inside the chunk tasks (CPU s), stitching + writing on its own
        # thread during the run, and what was left after the model
        print(f"{size:>6} px^2: peak RSS {r['peak_rss_mb']:7.0f} MB  wall {r['wall_s']:6.1f} s  "
              f"tiles {r['tiles']:6d}  GeoJSON {r['features']} features ({r['geojson_mb']:.1f} "
              f"MB): trace {t.get('chunk_geojson_s', 0):.1f} s cpu, stitch+write "
              f"{t.get('geojson_busy_s', t['geojson_s']):.1f} s, after model "
              f"{t['geojson_s']:.1f} s", flush=True)
    small, large = min(peaks), max(peaks)
    print(f"rss_growth_{large // 1000}k_vs_{small // 1000}k={peaks[large] / peaks[small]:.3f}")


if __name__ == "__main__":
    main()
