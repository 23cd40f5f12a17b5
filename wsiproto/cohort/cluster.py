"""Where a cohort runs: a local cluster, an existing dask scheduler, or SLURM jobs.

One function per kind (:func:`local_session`, :func:`scheduler_session`, :func:`slurm_session`),
each returning a :class:`Session`: the client, what it started, the dask resources every slide
task asks for, and what the worker task needs to know about the workers.

Listening: every server a cohort starts listens on 127.0.0.1 unless asked otherwise
(``ClusterChoice.listen`` / ``dashboard``): the local cluster's scheduler, its workers and
nannies, and the dashboard (on port 8787 when free, else on a free port: never dask's "port
already in use" warning). SLURM is the exception that cannot be: compute nodes must reach the
scheduler, so by default it listens on this machine's network address (not on every
interface); its dashboard stays on 127.0.0.1.

Lost workers: the scheduler of a cluster the cohort starts gives a slide whose worker died
(killed, out of memory, end of a SLURM job) ``retries`` more tries (dask's
``allowed-failures``), then reports it; :meth:`Session.lost_reason` says why a SLURM job ended
(walltime, cancelled, out of memory), from ``scontrol``; :meth:`Session.tick` brings the
cluster back to its size (a local worker the nanny did not restart, a SLURM job that ended).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8787


@dataclass
class SlurmOptions:
    """SLURM jobs through dask-jobqueue: each job runs ``processes`` worker processes.

    With ``gpus`` > 0 a job asks for ``--gres=gpu:<gpus>`` and runs one worker process per GPU,
    each advertising the dask resource ``GPU=1``; cohort tasks ask for ``GPU: 1``, so one GPU
    never runs two models. Without GPUs a job runs one worker process with all its cores.
    """

    queue: str | None = None
    account: str | None = None
    cores: int = 8
    memory: str = "32GB"
    walltime: str = "04:00:00"
    gpus: int = 0
    jobs: int = 1  # jobs running at once; a job that ends is replaced while slides remain
    job_extra: list[str] = field(default_factory=list)  # more #SBATCH directives
    prologue: list[str] = field(default_factory=list)  # shell lines before the worker starts
    local_directory: str | None = None  # worker scratch on the compute node
    log_directory: str | None = None  # job logs (SLURM's default: the submitting folder)
    python: str | None = None  # the workers' python (default: this one)

    @property
    def processes(self) -> int:
        return max(1, self.gpus)


@dataclass
class ClusterChoice:
    """Where the work runs: ``local`` (a LocalCluster of ``workers`` processes; None: sized to
    the machine), ``scheduler`` (``address`` of a running scheduler) or ``slurm``.

    ``listen``: the address the scheduler and workers the cohort starts listen on (None:
    127.0.0.1, or this machine's network address for SLURM). ``dashboard``: ``HOST`` (port
    8787 if free, else any free port), ``HOST:PORT``, or None for no dashboard."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    slurm: SlurmOptions | None = None
    listen: str | None = None
    dashboard: str | None = "127.0.0.1"


@dataclass
class Session:
    """A connected client and what the cohort started for it (closed by :meth:`close`)."""

    client: Any
    cluster: Any = None
    own: bool = False
    resources: dict | None = None
    spec_updates: dict = field(default_factory=dict)  # WorkerSpec fields for these workers
    description: str = ""
    size: dict = field(default_factory=dict)  # cluster.scale() arguments: n=... or jobs=...
    walltime: str = ""  # SLURM's, when the workers are SLURM jobs
    config: Any = None  # dask settings held while the cluster runs (restored by close)

    def tick(self) -> None:
        """Called now and then by the run loop: replace workers (local) or jobs (SLURM) that
        were lost. A nanny does restart a killed worker, but not always (a worker killed as it
        starts), and a SLURM job that ended is not resubmitted by itself."""
        if self.size and self.cluster is not None:
            self.cluster.scale(**self.size)

    def lost_reason(self, job: str) -> tuple[str, str]:
        """(why the SLURM job ``job`` ended, what to do) in words; ("", "") when unknown or
        not SLURM."""
        if not self.walltime or not job:
            return "", ""
        return slurm_job_end(job, self.walltime)

    def dashboard(self) -> str | None:
        return dashboard_link(self.client)

    def close(self) -> None:
        try:
            if self.own:
                self.client.close()
                if self.cluster is not None:
                    self.cluster.close()
        finally:
            if self.config is not None:
                self.config.__exit__(None, None, None)
                self.config = None


def free_port(host: str, preferred: int = DASHBOARD_PORT) -> int:
    """``preferred`` when nothing listens there on ``host``, else a port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise WsiprotoError(f"cannot listen on {host}",
                        hint="pass an address of this machine, e.g. --listen 127.0.0.1")


def http_address(spec: str | None, host: str) -> tuple[str, bool]:
    """(where the scheduler's HTTP server listens, whether it serves the dashboard).

    ``spec``: ``HOST`` (port 8787 when free, else a free one), ``HOST:PORT``, or None / "" /
    "none" for no dashboard. A dask scheduler runs its HTTP server (health, metrics) even
    without a dashboard, by default on port 8787 of ``host``: it gets a free port too."""
    if not spec or spec.lower() == "none":
        return f"{host}:{free_port(host)}", False
    _, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and not spec.endswith("]"):
        return spec, True
    return f"{spec}:{free_port(spec.strip('[]'))}", True


def dashboard_link(client) -> str | None:
    try:
        if "dashboard" in client.scheduler_info().get("services", {}):
            return client.dashboard_link
    except Exception:  # noqa: BLE001 - the link is a courtesy
        return None
    return None


def _cuda_devices() -> int:
    """GPUs on this machine (torch, only when CUDA is not hidden)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def local_workers(n_slides: int, gpus: int) -> int:
    """Default LocalCluster size: one worker per GPU; on CPUs one worker process per 4 cores
    but at least two (each with cores / workers torch threads), at most one per 4 GiB of memory
    and never more than the slides to run. Two workers overlap one slide's serial stages
    (pyramid, GeoJSON, overlay) with another's inference: on a 2-core machine
    (benchmarks/cohort_throughput.py, 6 slides of 2048 px) two workers with one torch thread
    each ran 1047 slides/hour against 818 for one worker with two threads."""
    if gpus:
        return max(1, min(gpus, n_slides))
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    n = min(cores, max(2, cores // 4))
    n = min(n, max(1, int(mem_gib // 4)))
    return max(1, min(n, n_slides))


def _scheduler_config(retries: int):
    """dask settings for a cluster started here, held while it runs: ``retries`` more tries
    for a slide whose worker died; a lost worker or SLURM job noticed (and replaced) after 2 s
    instead of 15."""
    import dask

    return dask.config.set({"distributed.scheduler.allowed-failures": max(0, retries),
                            "distributed.deploy.lost-worker-timeout": "2s"})


def local_session(choice: ClusterChoice, device: str, n_slides: int, retries: int) -> Session:
    from distributed import Client, LocalCluster

    gpus = 0 if device == "cpu" else _cuda_devices()
    if device.startswith("cuda") and not gpus:
        raise WsiprotoError("--device cuda was asked for but no CUDA GPU is available",
                            hint="use --device cpu or auto")
    n = choice.workers or local_workers(n_slides, gpus)
    threads = max(1, (os.cpu_count() or 1) // n)
    resources = {"GPU": 1} if gpus else None
    host = choice.listen or "127.0.0.1"
    http, dashboard = http_address(choice.dashboard, host)
    config = _scheduler_config(retries)
    try:
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, resources=resources, host=host,
            dashboard_address=http, scheduler_kwargs={"dashboard": dashboard},
            silence_logs=logging.ERROR,
        )
    except BaseException:
        config.__exit__(None, None, None)
        raise
    what = f"{gpus} GPU(s), " if gpus else ""
    return Session(Client(cluster), cluster, True, resources,
                   {"torch_threads": threads, "gpus_per_host": gpus if gpus > 1 else 0},
                   f"local cluster: {n} worker process(es), {what}{threads} torch thread(s) "
                   "each", size={"n": n}, config=config)


def scheduler_session(choice: ClusterChoice, device: str, echo, timeout_s: float = 5.0
                      ) -> Session:
    from distributed import Client

    try:
        client = Client(choice.address, timeout=f"{timeout_s}s")
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise WsiprotoError(f"cannot connect to the dask scheduler ({reason})",
                            path=choice.address,
                            hint="check the address (tcp://host:8786) and that the scheduler "
                                 "is running") from None
    workers = client.scheduler_info().get("workers", {})
    per_host: dict[str, int] = {}
    for w in workers.values():
        host = str(w.get("host") or w["id"])
        per_host[host] = per_host.get(host, 0) + 1
    gpu_workers = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))
    if not workers:
        echo("warning: the scheduler has no workers yet: slides wait until workers join")
    elif device.startswith("cuda") and not gpu_workers:
        echo("warning: --device cuda but no worker advertises the GPU resource yet: tasks "
             "wait for workers started with `--resources GPU=1`")
    gpu = device.startswith("cuda") or (device == "auto" and gpu_workers)
    return Session(client, None, True, {"GPU": 1} if gpu else None,
                   {"workers_per_host": tuple(sorted(per_host.items()))},
                   f"scheduler {choice.address}: {len(workers)} worker(s)"
                   + (f", {gpu_workers} with a GPU" if gpu_workers else ""))


def slurm_cluster(opts: SlurmOptions, *, listen: str | None = None,
                  dashboard: str | None = "127.0.0.1", **kwargs):
    """A dask-jobqueue ``SLURMCluster`` for cohort work (no jobs submitted yet).

    ``cluster.job_script()`` shows exactly what ``sbatch`` will get; ``cluster.scale(jobs=n)``
    submits. ``listen``: the scheduler's address (default: this machine's network address,
    which the compute nodes must reach); extra ``kwargs`` go to ``SLURMCluster`` (e.g.
    ``interface="ib0"``).
    """
    from dask_jobqueue import SLURMCluster
    from distributed.utils import get_ip

    host = listen or get_ip()
    http, show = http_address(dashboard, "127.0.0.1")
    extra = list(opts.job_extra)
    if opts.log_directory:  # as directives: printing a script creates no folder
        extra += [f"-o {opts.log_directory}/%x-%j.out", f"-e {opts.log_directory}/%x-%j.err"]
    worker_args: list[str] = ["--no-dashboard", "--nthreads", "1"]
    if opts.gpus:
        extra.append(f"--gres=gpu:{opts.gpus}")
        worker_args += ["--resources", "GPU=1"]
    kw = {
        "queue": opts.queue, "account": opts.account, "cores": opts.cores, "memory": opts.memory,
        "walltime": opts.walltime, "processes": opts.processes, "job_extra_directives": extra,
        "job_script_prologue": list(opts.prologue), "worker_extra_args": worker_args,
        "python": opts.python or sys.executable, "job_name": "wsiproto-cohort",
        "scheduler_options": {"host": host, "dashboard_address": http, "dashboard": show},
    }
    if opts.local_directory:
        kw["local_directory"] = opts.local_directory
    kw.update(kwargs)
    return SLURMCluster(**kw)


def slurm_session(choice: ClusterChoice, n_slides: int, retries: int) -> Session:
    from distributed import Client

    opts = choice.slurm or SlurmOptions()
    parse_walltime(opts.walltime)
    if opts.log_directory:
        os.makedirs(opts.log_directory, exist_ok=True)
    config = _scheduler_config(retries)  # held while the cluster runs: job replacement
    try:
        cluster = slurm_cluster(opts, listen=choice.listen, dashboard=choice.dashboard)
    except BaseException:
        config.__exit__(None, None, None)
        raise
    jobs = max(1, min(opts.jobs, -(-n_slides // opts.processes)))
    cluster.scale(jobs=jobs)
    threads = max(1, opts.cores // opts.processes)
    session = Session(Client(cluster), cluster, True, {"GPU": 1} if opts.gpus else None,
                      {"torch_threads": threads,
                       "gpus_per_host": opts.gpus if opts.gpus > 1 else 0},
                      f"SLURM: {jobs} job(s) of {opts.cores} cores, {opts.memory}, walltime "
                      f"{opts.walltime}" + (f", {opts.gpus} GPU(s)" if opts.gpus else "")
                      + " (workers join as the jobs start)", size={"jobs": jobs},
                      walltime=opts.walltime, config=config)
    return session


def parse_walltime(text: str) -> int:
    """Seconds in a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise WsiprotoError(f"--slurm-walltime {text!r} is not a SLURM time limit",
                            hint="use HH:MM:SS, MM, MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        parts = [int(days) * 24 + int(a), int(b or 0), int(c or 0)]
    elif c is not None:  # HH:MM:SS
        parts = [int(a), int(b), int(c)]
    else:  # MM[:SS]
        parts = [0, int(a), int(b or 0)]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def slurm_job_end(job: str, walltime: str) -> tuple[str, str]:
    """(why SLURM job ``job`` ended, what to do), from ``scontrol show job``; ("", "") when
    it cannot say."""
    try:
        text = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                              text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "", ""
    state = re.search(r"\bJobState=(\S+)", text)
    reason = re.search(r"\bReason=(\S+)", text)
    state, reason = (state.group(1) if state else ""), (reason.group(1) if reason else "")
    if state == "TIMEOUT" or reason == "TimeLimit":
        return (f"its SLURM job {job} reached the walltime ({walltime}) before the slide was "
                "finished", "raise --slurm-walltime (finished chunks are kept: a rerun resumes)")
    if state == "OUT_OF_MEMORY":
        return f"its SLURM job {job} ran out of memory", "raise --slurm-memory"
    if state in ("CANCELLED", "PREEMPTED", "NODE_FAIL", "FAILED", "BOOT_FAIL", "DEADLINE"):
        return (f"its SLURM job {job} ended ({state.lower().replace('_', ' ')})",
                "rerun to resume it (finished chunks are kept)")
    return "", ""


def start(choice: ClusterChoice, device: str, n_slides: int, retries: int, echo) -> Session:
    """The :class:`Session` of ``choice``."""
    if choice.kind == "local":
        return local_session(choice, device, n_slides, retries)
    if choice.kind == "scheduler":
        return scheduler_session(choice, device, echo)
    if choice.kind == "slurm":
        return slurm_session(choice, n_slides, retries)
    raise ValueError(f"unknown cluster kind {choice.kind!r}")


__all__ = ["ClusterChoice", "Session", "SlurmOptions", "free_port", "http_address",
           "local_session", "local_workers", "parse_walltime", "scheduler_session", "slurm_cluster",
           "slurm_session", "start"]
