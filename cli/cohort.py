"""``wsiproto cohort INPUTS...``: many slides on a dask.distributed cluster, resumable.

Exit codes: 0 when every slide is done; 1 with ``--skip-errors`` when any slide failed or was
skipped (the run went through all of them); 2 for a user error, including the first failed
slide without ``--skip-errors`` (the run stops there, the manifest says what was done).
"""

from __future__ import annotations

from .options import non_negative_int, positive_int

EXAMPLE = ("wsiproto cohort slides/ --model runs/bcss --out cohort --skip-errors   "
           "# -> cohort/manifest.csv, cohort.csv, report.html, cohort/<slide>/...")

DESCRIPTION = """\
segment many slides on a dask.distributed cluster: a local cluster of worker processes
(default), an existing scheduler (--scheduler) or SLURM jobs (--slurm). INPUTS are slide
files, folders (searched recursively for slide files) or CSV files with a `slide` column.
Reruns skip slides already done for the same model and options and retry failed ones;
OUT/manifest.csv records every slide, OUT/cohort.csv its class areas, OUT/report.html shows
them all."""


def register(sub) -> None:
    from . import add_command
    from .segment import add_segment_options

    p = add_command(sub, "cohort", "segment many slides on a dask cluster (local, scheduler, "
                    "SLURM), resumable", EXAMPLE, description=DESCRIPTION)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slide file, folder of slides, or CSV with a `slide` column")
    # The segment options, with --workers taking its cohort meaning (worker processes); the
    # chunks in flight per slide move to --chunk-workers.
    p.conflict_handler = "resolve"
    add_segment_options(p)
    where = p.add_argument_group("where the slides run (one of)")
    excl = where.add_mutually_exclusive_group()
    excl.add_argument("--workers", type=positive_int, default=None,
                      help="local cluster of N worker processes (default: one per GPU, else "
                           "one per 4 CPU cores and at least 2, at most one per 4 GiB of "
                           "memory; never more than the slides to run)")
    excl.add_argument("--scheduler", metavar="ADDRESS", default=None,
                      help="an existing dask scheduler, e.g. tcp://10.0.0.5:8786 (GPU workers: "
                           "start them with `--resources GPU=1`)")
    excl.add_argument("--slurm", action="store_true",
                      help="submit SLURM jobs through dask-jobqueue (--slurm-* options)")
    net = p.add_argument_group("network (the servers this command starts)")
    net.add_argument("--listen", metavar="HOST", default=None,
                     help="address the local cluster's or the SLURM cluster's scheduler (and "
                          "the local workers) listen on; default 127.0.0.1 (this machine "
                          "only), with --slurm this machine's network address (compute nodes "
                          "must reach it)")
    net.add_argument("--dashboard", metavar="HOST[:PORT]|none", default="127.0.0.1",
                     help="where the dask dashboard listens: default 127.0.0.1, port 8787 "
                          "when free else a free one; e.g. 0.0.0.0:8787 to open it to other "
                          "machines (it shows workers, slide names and logs), none for none")
    p.add_argument("--chunk-workers", type=positive_int, default=None,
                   help="chunks in flight within one slide (default: 1 with the model on a "
                        "CPU, 2 on a GPU)")
    p.add_argument("--skip-errors", action="store_true",
                   help="go on past slides that fail (exit code 1 if any did); default: stop at "
                        "the first failure")
    p.add_argument("--retries", type=non_negative_int, default=1,
                   help="extra attempts for a slide whose worker was lost (killed, out of "
                        "memory, end of its SLURM job) or that hit an unexpected error (not "
                        "for unreadable slides); default 1")
    s = p.add_argument_group("SLURM (with --slurm)")
    s.add_argument("--slurm-queue", default=None, help="partition (#SBATCH -p)")
    s.add_argument("--slurm-account", default=None, help="account (#SBATCH -A)")
    s.add_argument("--slurm-cores", type=positive_int, default=8, help="cores per job (default 8)")
    s.add_argument("--slurm-memory", default="32GB", help="memory per job (default 32GB)")
    s.add_argument("--slurm-walltime", default="04:00:00", help="per job (default 04:00:00)")
    s.add_argument("--slurm-gpus", type=non_negative_int, default=0,
                   help="GPUs per job; one worker process per GPU (default 0)")
    s.add_argument("--slurm-jobs", type=positive_int, default=4,
                   help="jobs running at once; a job that ends while slides remain is "
                        "replaced (default 4)")
    s.add_argument("--slurm-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="another #SBATCH directive, e.g. --slurm-extra=--qos=long (repeatable)")
    s.add_argument("--slurm-prologue", action="append", default=[], metavar="LINE",
                   help="shell line run before the worker, e.g. 'module load cuda' (repeatable)")
    s.add_argument("--slurm-local-directory", default=None,
                   help="worker scratch folder on the compute nodes (e.g. $TMPDIR)")
    s.add_argument("--slurm-log-directory", default=None,
                   help="folder for the job logs (default: OUT/slurm-logs)")
    s.add_argument("--slurm-print-script", action="store_true",
                   help="print the job script that would be submitted and exit")
    p.set_defaults(func=run)


def slurm_options(args):
    from pathlib import Path

    from wsiproto.cohort import SlurmOptions
    from wsiproto.cohort.layout import JOB_LOGS

    return SlurmOptions(
        queue=args.slurm_queue, account=args.slurm_account, cores=args.slurm_cores,
        memory=args.slurm_memory, walltime=args.slurm_walltime, gpus=args.slurm_gpus,
        jobs=args.slurm_jobs, job_extra=list(args.slurm_extra),
        prologue=list(args.slurm_prologue), local_directory=args.slurm_local_directory,
        log_directory=args.slurm_log_directory or str(Path(args.out).absolute() / JOB_LOGS),
    )


def run(args) -> int:
    import logging
    import sys

    from wsiproto.cohort import ClusterChoice, format_summary, run_cohort, slurm_cluster
    from wsiproto.errors import WsiprotoError

    from .segment import options_from_args

    if not args.debug:  # distributed logs the cluster's life at INFO, and chatty warnings
        import distributed  # noqa: F401 - its loggers exist (with their levels) once imported

        for name in list(logging.root.manager.loggerDict):
            if name == "distributed" or name.startswith("distributed."):
                logging.getLogger(name).setLevel(logging.ERROR)
    if args.slurm_print_script:
        cluster = slurm_cluster(slurm_options(args), listen=args.listen, dashboard=None)
        try:
            print(cluster.job_script())
        finally:
            cluster.close()
        return 0
    args_workers, args.workers = args.workers, args.chunk_workers
    opts = options_from_args(args)  # --workers here: chunks in flight per slide
    if args.batch_size:
        opts.batch_size = args.batch_size
    net = {"listen": args.listen, "dashboard": args.dashboard}
    if args.scheduler:
        choice = ClusterChoice("scheduler", address=args.scheduler)
    elif args.slurm:
        choice = ClusterChoice("slurm", slurm=slurm_options(args), **net)
    else:
        choice = ClusterChoice("local", workers=args_workers, **net)
    result = run_cohort(
        args.inputs, opts, model=args.model, device=args.device, precision=args.precision,
        tta=args.tta, batch_size=args.batch_size, cluster=choice, skip_errors=args.skip_errors,
        retries=args.retries, progress=not args.quiet,
    )
    print(format_summary(result))
    sys.stdout.flush()
    if result.all_done:
        return 0
    if result.stopped_early and result.failed:
        slide, reason = result.failed[0]
        reason = reason if reason.startswith(slide) else f"{slide}: {reason}"
        raise WsiprotoError(
            f"{reason} (cohort stopped; details in {result.manifest})",
            hint="fix or remove the slide and rerun (done slides are kept), or pass "
                 "--skip-errors to go on past failing slides",
        )
    return 1
