"""A cohort on SLURM with one GPU per job, through dask-jobqueue.

    python examples/cohort_slurm.py SLIDES --model MODEL_DIR --out RESULTS \
        [--queue gpu] [--account LAB] [--jobs 8] [--submit]

Builds the SLURMCluster that `wsiproto cohort --slurm` uses: each job asks for one GPU
(`--gres=gpu:1`), 8 cores and 32 GB, runs one dask worker process with one thread that
advertises the resource GPU=1, and every slide task asks for GPU=1: one model per GPU. Without
``--submit`` (or on a machine without SLURM) it only prints the job script that would be
submitted. With ``--submit`` it runs the cohort: up to ``--jobs`` jobs, each segmenting slides
one after another with its model loaded once; the client (this script) must stay alive, e.g. on
a login node in tmux or inside a small CPU job of its own.

The command-line equivalent:

    wsiproto cohort SLIDES --model MODEL_DIR --out RESULTS --skip-errors --device cuda \
        --slurm --slurm-queue gpu --slurm-gpus 1 --slurm-cores 8 --slurm-memory 32GB \
        --slurm-walltime 04:00:00 --slurm-jobs 8 --slurm-prologue 'module load cuda'

(add ``--slurm-print-script`` to see the job script without submitting anything).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from wsiproto.cohort import (
    ClusterChoice,
    SlurmOptions,
    format_summary,
    run_cohort,
    slurm_cluster,
)
from wsiproto.segment import SegmentOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", nargs="+", help="slides, folders or CSV files with `slide`")
    ap.add_argument("--model", required=True, help="model folder on the shared file system")
    ap.add_argument("--out", default="results", help="output folder on the shared file system")
    ap.add_argument("--queue", default="gpu")
    ap.add_argument("--account", default=None)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--submit", action="store_true", help="submit the jobs and run the cohort")
    args = ap.parse_args()

    slurm = SlurmOptions(
        queue=args.queue, account=args.account, cores=8, memory="32GB", walltime="04:00:00",
        gpus=1, jobs=args.jobs, prologue=["module load cuda || true"],
        local_directory="$TMPDIR",  # worker scratch on the node's local disk
        # job logs beside the results (the cohort creates the folder when it submits)
        log_directory=str(Path(args.out).absolute() / "slurm-logs"),
    )
    cluster = slurm_cluster(slurm)
    try:
        print(cluster.job_script())
    finally:
        cluster.close()
    if not args.submit:
        if shutil.which("sbatch") is None:
            print("# no sbatch on this machine: shown the job script only")
        else:
            print("# add --submit to run the cohort with this job script")
        return
    result = run_cohort(args.slides, SegmentOptions(out=Path(args.out)), model=args.model,
                        device="cuda", cluster=ClusterChoice("slurm", slurm=slurm),
                        skip_errors=True)
    print(format_summary(result))
    raise SystemExit(0 if result.all_done else 1)


if __name__ == "__main__":
    main()
