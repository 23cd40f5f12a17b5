"""A cohort on one workstation: every slide of a folder through a local dask cluster.

    python examples/cohort_workstation.py SLIDES_DIR --model MODEL_DIR [--out cohort] [--workers N]

The same as `wsiproto cohort SLIDES_DIR --model MODEL_DIR --out cohort --skip-errors`, from
Python: a LocalCluster of worker processes (one per GPU when there are GPUs, else one per 4
cores), each loading the model once; then the per-slide class areas are read from cohort.csv.
Run it twice: the second run finds the finished slides in the manifest and does no work.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from wsiproto.cohort import ClusterChoice, format_summary, run_cohort
from wsiproto.segment import SegmentOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", help="a folder of slides (or slide files, or a CSV with `slide`)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="cohort")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: auto)")
    args = ap.parse_args()

    result = run_cohort(
        [args.slides], SegmentOptions(out=Path(args.out)), model=args.model,
        cluster=ClusterChoice("local", workers=args.workers), skip_errors=True,
    )
    print(format_summary(result))

    with open(result.cohort_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "done":
                print(f"{Path(row['slide']).name}: tumour {float(row['TUM_pct']):.1f}% of "
                      f"{float(row['tissue_area_mm2']):.1f} mm^2 tissue"
                      if "TUM_pct" in row else Path(row["slide"]).name)
    raise SystemExit(0 if result.all_done else 1)


# The guard matters: LocalCluster starts worker processes that import this file again.
if __name__ == "__main__":
    main()
