"""Cohorts: thousands of slides through :func:`~wsiproto.segment.segment_slide` on a
dask.distributed cluster, resumable, with one manifest row per slide.

How a run goes (:func:`run_cohort`):

1. **Inputs** (:func:`discover_slides`): slide files, folders (searched recursively for slide
   files) and CSV files with a ``slide`` column (relative paths are relative to the CSV).
2. **Plan**: the manifest ``OUT/manifest.csv`` from earlier runs is read. A slide whose row says
   ``done`` for the same *run key* (model weights digest + device/precision/TTA request + every
   option that changes outputs), whose file is unchanged (size, mtime) and whose
   ``OUT/<stem>/summary.json`` still carries the recorded config hash is not submitted at all.
   Everything else (new, failed, changed, interrupted) is submitted. Two inputs that would write
   the same ``OUT/<stem>`` folder are not: the later one is ``skipped`` with the reason.
3. **Cluster**: a :class:`distributed.LocalCluster` of worker processes (default), an existing
   scheduler, or SLURM jobs through dask-jobqueue (:func:`slurm_cluster`). One task per slide;
   the task gets the slide's *path* and opens the file on the worker (slides are never read or
   scattered by the client). Every worker runs one slide at a time (one dask thread) and keeps
   one model in memory across slides (:func:`worker_model`). GPU workers advertise the resource
   ``GPU=1`` and every task asks for ``GPU: 1``, so a GPU never runs two models.
4. **Results** come back as the tasks finish: the manifest is rewritten atomically (temporary
   file + rename, at most once a second and at the end), a failure's full traceback goes to
   ``OUT/manifest-tracebacks/<stem>.txt`` and its one-line reason into the manifest.
   :class:`~wsiproto.errors.WsiprotoError` (a bad slide: missing, corrupt, no mpp) is final;
   any other exception is retried up to ``retries`` times. A worker that dies mid-slide
   (killed, out of memory) is the scheduler's business: distributed reschedules its task on
   another worker, and ``segment_slide`` resumes the slide from its finished chunks.
5. **End**: ``OUT/cohort.csv`` (per-slide tissue and class areas in mm^2 and % of tissue) and a
   table on the terminal.

Memory: a worker holds one model and one slide in flight; ``segment_slide`` bounds a slide's
memory by chunk size x chunks in flight (``SegmentOptions.workers``), never by slide size.
Threads: dask's nanny starts workers with ``OMP_NUM_THREADS=1``; the task sets torch's thread
count explicitly: cores / worker processes on the host (local), cores per job / processes per
job (SLURM), or the host's cores / the workers seen on that host (existing scheduler).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsiproto.errors import WsiprotoError
from wsiproto.files import write_text_atomic
from wsiproto.segment.options import SegmentOptions

log = logging.getLogger(__name__)

#: File suffixes that folder inputs are searched for (what OpenSlide / tiffslide open as a
#: single file). DICOM WSI series (many .dcm files per slide) are not collected from folders.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
                  ".svslide", ".qptiff")

MANIFEST = "manifest.csv"
TRACEBACKS = "manifest-tracebacks"
COHORT_CSV = "cohort.csv"
LOCK = ".cohort.lock"
STATUSES = ("done", "failed", "skipped")

MANIFEST_FIELDS = (
    "slide", "status", "outputs", "config_hash", "run_key", "slide_bytes", "slide_mtime_ns",
    "attempts", "worker", "started", "finished", "duration_s", "model_load_s", "segment_s",
    "error", "traceback",
)


# --------------------------------------------------------------------------------------------
# Inputs


def output_stem(path: str | os.PathLike) -> str:
    """The name of a slide's output folder, as :func:`segment_slide` derives it."""
    from wsiproto.segment.folder import output_name

    return output_name(path).name


def _slides_from_csv(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WsiprotoError(f"cannot read the CSV file ({reason})", path=path,
                            hint="pass a readable UTF-8 CSV with a `slide` column") from exc
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip().lower() for h in (reader.fieldnames or []) if h is not None]
        if "slide" not in header:
            cols = ", ".join(header) or "none"
            raise WsiprotoError(
                f"the CSV has no `slide` column (columns: {cols})", path=path,
                hint="add a header row with a column named slide holding slide paths",
            )
        key = next(h for h in reader.fieldnames if h.strip().lower() == "slide")
        rows = [(row.get(key) or "").strip() for row in reader]
    except csv.Error as exc:
        raise WsiprotoError(f"not a readable CSV file ({exc})", path=path,
                            hint="pass a CSV with a header row and a `slide` column") from exc
    base = path.parent
    return [Path(r).expanduser() if Path(r).expanduser().is_absolute() else base / r
            for r in rows if r]


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def discover_slides(inputs: Iterable[str | os.PathLike], *,
                    exclude: str | os.PathLike | None = None) -> list[Path]:
    """Slide paths from slides, folders and CSV files, in input order, without duplicates.

    A folder is searched recursively for :data:`SLIDE_SUFFIXES` (hidden entries and anything
    under ``exclude``, the output folder, are left out). A path that does not exist is kept as
    a slide: it fails on its own with "no such file" rather than hiding among the others.
    Raises :class:`WsiprotoError` when nothing is found.
    """
    out: list[Path] = []
    seen: set[str] = set()
    excl = Path(exclude) if exclude is not None else None
    inputs = [Path(i).expanduser() for i in inputs]

    def add(p: Path) -> None:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(Path(key))

    for item in inputs:
        if item.is_dir() and item.suffix.lower() not in SLIDE_SUFFIXES:
            found = []
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not _inside(Path(root) / d, excl)
                                 and not d.endswith(".zarr"))
                found += [Path(root) / f for f in files
                          if not f.startswith(".") and Path(f).suffix.lower() in SLIDE_SUFFIXES]
            for p in sorted(found):
                add(p)
        elif item.suffix.lower() == ".csv":
            if not item.exists():
                raise WsiprotoError("no such CSV file", path=item, hint="check the path")
            for p in _slides_from_csv(item):
                add(p)
        else:
            add(item)
    if not out:
        names = ", ".join(str(i) for i in inputs) or "(none given)"
        raise WsiprotoError(
            f"no slides found in {names}",
            hint=f"pass slide files, folders holding {', '.join(SLIDE_SUFFIXES[:6])} ... files, "
                 "or a CSV with a `slide` column",
        )
    return out


# --------------------------------------------------------------------------------------------
# Manifest


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Manifest:
    """``OUT/manifest.csv``: one row per slide (:data:`MANIFEST_FIELDS`), keyed by the slide's
    absolute path; rows of slides that are not part of this run are kept as they are.

    Only the client writes it, atomically (temporary file + rename): a reader or a crash never
    sees half a file. ``save()`` rewrites at most once per ``min_interval_s`` (a cohort of
    thousands finishing slides every second would otherwise rewrite megabytes per slide);
    ``save(force=True)`` always writes.
    """

    def __init__(self, folder: str | os.PathLike, min_interval_s: float = 1.0):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.min_interval_s = min_interval_s
        self.rows: dict[str, dict[str, str]] = {}
        self._last_save = 0.0
        self._dirty = False
        if self.path.exists():
            try:
                with open(self.path, newline="", encoding="utf-8") as fh:
                    for row in csv.DictReader(fh):
                        if row.get("slide"):
                            self.rows[row["slide"]] = {k: row.get(k) or "" for k in MANIFEST_FIELDS}
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                raise WsiprotoError(f"cannot read the manifest ({exc})", path=self.path,
                                    hint="move it away to start the cohort afresh") from exc

    def get(self, slide: str) -> dict[str, str]:
        return self.rows.get(slide, {})

    def update(self, slide: str, **values: Any) -> dict[str, str]:
        row = self.rows.setdefault(slide, {k: "" for k in MANIFEST_FIELDS})
        row["slide"] = slide
        for k, v in values.items():
            if k not in MANIFEST_FIELDS:
                raise KeyError(k)
            row[k] = "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        self._dirty = True
        return row

    def save(self, force: bool = False) -> None:
        if not (self._dirty or force):
            return
        if not force and time.monotonic() - self._last_save < self.min_interval_s:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        write_text_atomic(self.path, buf.getvalue())
        self._last_save = time.monotonic()
        self._dirty = False


class _FolderLock:
    """``OUT/.cohort.lock``: one cohort run per output folder. A lock left by a process that
    no longer exists on this host is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = self.path.read_text().split()
                    pid = int(pid)
                except (OSError, ValueError):
                    host, pid = "", 0
                alive = host == socket.gethostname() and pid > 0 and _pid_alive(pid)
                if alive or (host and host != socket.gethostname()):
                    raise WsiprotoError(
                        f"another wsiproto cohort run (pid {pid} on {host or '?'}) is writing "
                        "to this folder", path=self.path.parent,
                        hint=f"wait for it to finish, or delete {self.path} if it is gone",
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its predictor (picklable, sent with every task).

    ``model``: an absolute model folder (must be visible to the workers, e.g. on a shared file
    system). ``gpus_per_host``: > 1 when several worker processes share a host with that many
    GPUs (a multi-GPU workstation or SLURM job): each worker then takes GPU ``index % n`` where
    ``index`` is the number its name ends with. ``torch_threads``: intra-op threads for torch
    (None: the host's cores / ``workers_per_host[host]``).
    """

    model: str
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    batch_size: int | None = None
    torch_threads: int | None = None
    gpus_per_host: int = 0
    workers_per_host: tuple[tuple[str, int], ...] = ()

    def cache_key(self, device: str) -> tuple:
        return (self.model, device, self.precision, self.tta, self.batch_size)


_MODELS: dict[tuple, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def _worker_identity() -> tuple[str, str]:
    """(worker address, worker name) inside a dask worker; ('', '') elsewhere."""
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.address), str(w.name)
    except (ImportError, ValueError):
        return "", ""


def _worker_device(spec: WorkerSpec, name: str) -> str:
    if spec.device == "cpu" or spec.gpus_per_host <= 1:
        return spec.device
    m = re.search(r"(\d+)$", name)
    index = int(m.group(1)) if m else 0
    return f"cuda:{index % spec.gpus_per_host}"


def _torch_threads(spec: WorkerSpec, address: str) -> int:
    if spec.torch_threads:
        return max(1, int(spec.torch_threads))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    host = address.split("://")[-1].rsplit(":", 1)[0]
    per_host = dict(spec.workers_per_host).get(host, 1)
    return max(1, cores // max(1, per_host))


def worker_model(spec: WorkerSpec) -> tuple[Any, Any, float]:
    """This worker process's (predictor, BatchRunner, seconds spent loading now).

    A module-level cache: the first task on a worker loads the model, later tasks reuse it and
    its inference thread. A task with a different spec (another cohort on the same long-lived
    cluster) replaces the cached model, so a worker never holds two.
    """
    import torch

    from wsiproto.segment.infer import BatchRunner
    from wsiproto.segment.predictor import load_predictor

    address, name = _worker_identity()
    device = _worker_device(spec, name)
    key = spec.cache_key(device)
    with _MODELS_LOCK:
        if key in _MODELS:
            predictor, runner = _MODELS[key]
            return predictor, runner, 0.0
        t0 = time.perf_counter()
        for _, old_runner in _MODELS.values():
            old_runner.close()
        _MODELS.clear()
        torch.set_num_threads(_torch_threads(spec, address))
        predictor = load_predictor(spec.model, device=device, precision=spec.precision,
                                   tta=spec.tta)
        runner = BatchRunner(predictor, batch_size=spec.batch_size or predictor.default_batch_size)
        _MODELS[key] = (predictor, runner)
        return predictor, runner, time.perf_counter() - t0


def segment_task(slide: str, spec: WorkerSpec, options: SegmentOptions) -> dict:
    """The task run on a worker for one slide; never raises for a slide's own failure.

    Returns a plain dict: ``status`` ("done" or "failed"), timings, where it ran, and either the
    summary's essentials or ``error`` (one line), ``traceback`` and ``permanent`` (True for a
    :class:`WsiprotoError`: retrying cannot help).
    """
    for name in ("tifffile", "tiffslide"):  # a damaged file's oddities: the manifest has why
        logging.getLogger(name).setLevel(logging.CRITICAL)
    address, _ = _worker_identity()
    result: dict[str, Any] = {
        "slide": slide, "worker": address or f"{socket.gethostname()}:{os.getpid()}",
        "host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
    }
    t0 = time.perf_counter()
    try:
        from wsiproto.segment import segment_slide

        predictor, runner, load_s = worker_model(spec)
        result["model_load_s"] = load_s
        opts = dataclasses.replace(options, quiet=True, batch_size=runner.batch_size)
        run = segment_slide(slide, predictor, opts, runner=runner)
        summary = run.summary
        result.update(
            status="done",
            config_hash=summary["config_hash"],
            already_complete=run.already_complete,
            resumed=run.resumed,
            segment_s=float(summary.get("timings", {}).get("total_s", 0.0)),
            tissue_area_mm2=summary.get("tissue_area_mm2"),
            class_area_mm2=summary.get("class_area_mm2", {}),
            class_percent_of_tissue=summary.get("class_percent_of_tissue", {}),
            outputs=summary.get("outputs", {}),
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a manifest row
        result.update(status="failed", error=_one_line(exc), traceback=traceback.format_exc(),
                      permanent=isinstance(exc, WsiprotoError))
    result["finished"] = _now()
    result["duration_s"] = time.perf_counter() - t0
    return result


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, WsiprotoError):
        return str(exc)
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------
# Clusters


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
    jobs: int = 1  # jobs submitted (the most that run at once)
    job_extra: list[str] = field(default_factory=list)  # more #SBATCH directives
    prologue: list[str] = field(default_factory=list)  # shell lines before the worker starts
    local_directory: str | None = None  # worker scratch on the compute node
    log_directory: str | None = None
    python: str | None = None  # the workers' python (default: this one)

    @property
    def processes(self) -> int:
        return max(1, self.gpus)


def slurm_cluster(opts: SlurmOptions, **kwargs):
    """A dask-jobqueue ``SLURMCluster`` for cohort work (no jobs submitted yet).

    ``cluster.job_script()`` shows exactly what ``sbatch`` will get; ``cluster.scale(jobs=n)``
    submits. Extra ``kwargs`` go to ``SLURMCluster`` (e.g. ``interface="ib0"``).
    """
    import sys

    from dask_jobqueue import SLURMCluster

    extra = list(opts.job_extra)
    worker_args: list[str] = ["--nthreads", "1"]
    if opts.gpus:
        extra.append(f"--gres=gpu:{opts.gpus}")
        worker_args += ["--resources", "GPU=1"]
    kw = {
        "queue": opts.queue, "account": opts.account, "cores": opts.cores, "memory": opts.memory,
        "walltime": opts.walltime, "processes": opts.processes, "job_extra_directives": extra,
        "job_script_prologue": list(opts.prologue), "worker_extra_args": worker_args,
        "python": opts.python or sys.executable, "job_name": "wsiproto-cohort",
    }
    if opts.local_directory:
        kw["local_directory"] = opts.local_directory
    if opts.log_directory:
        kw["log_directory"] = opts.log_directory
    kw.update(kwargs)
    return SLURMCluster(**kw)


@dataclass
class ClusterChoice:
    """Where the work runs: ``local`` (LocalCluster of ``workers`` processes; None: sized to the
    machine), ``scheduler`` (``address`` of a running scheduler) or ``slurm``."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    slurm: SlurmOptions | None = None


def _cuda_devices() -> int:
    """GPUs on this machine, without initialising CUDA in the client (nvidia-smi, then torch)."""
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


@dataclass
class _Session:
    client: Any
    cluster: Any = None
    own: bool = False
    resources: dict | None = None
    spec_updates: dict = field(default_factory=dict)
    description: str = ""

    def close(self) -> None:
        if not self.own:
            return
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _start(choice: ClusterChoice, device: str, n_slides: int, echo) -> _Session:
    from distributed import Client, LocalCluster

    if choice.kind == "local":
        gpus = 0 if device == "cpu" else _cuda_devices()
        if device.startswith("cuda") and not gpus:
            raise WsiprotoError("--device cuda was asked for but no CUDA GPU is available",
                                hint="use --device cpu or auto")
        n = choice.workers or local_workers(n_slides, gpus)
        cores = os.cpu_count() or 1
        resources = {"GPU": 1} if gpus else None
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, resources=resources,
            dashboard_address=":8787",
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        what = f"{gpus} GPU(s), " if gpus else ""
        return _Session(client, cluster, True, resources,
                        {"torch_threads": max(1, cores // n), "gpus_per_host": gpus if gpus > 1 else 0},
                        f"local cluster: {n} worker process(es), {what}{max(1, cores // n)} "
                        "torch thread(s) each")
    if choice.kind == "scheduler":
        try:
            client = Client(choice.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise WsiprotoError(f"cannot connect to the dask scheduler ({exc})",
                                path=choice.address,
                                hint="check the address (tcp://host:8786) and that the "
                                     "scheduler is running") from exc
        workers = client.scheduler_info().get("workers", {})
        per_host: dict[str, int] = {}
        for w in workers.values():
            host = str(w.get("host") or w["id"])
            per_host[host] = per_host.get(host, 0) + 1
        gpu_workers = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))
        if device.startswith("cuda") and not gpu_workers:
            echo("warning: --device cuda but no worker advertises the GPU resource yet: tasks "
                 "wait for workers started with `--resources GPU=1`")
        resources = {"GPU": 1} if (device.startswith("cuda") or (device == "auto" and gpu_workers)) \
            else None
        return _Session(client, None, True, resources,
                        {"workers_per_host": tuple(sorted(per_host.items()))},
                        f"scheduler {choice.address}: {len(workers)} worker(s)"
                        + (f", {gpu_workers} with a GPU" if gpu_workers else ""))
    if choice.kind == "slurm":
        opts = choice.slurm or SlurmOptions()
        cluster = slurm_cluster(opts)
        jobs = max(1, min(opts.jobs, -(-n_slides // opts.processes)))
        cluster.scale(jobs=jobs)
        client = Client(cluster)
        resources = {"GPU": 1} if opts.gpus else None
        threads = max(1, opts.cores // opts.processes)
        return _Session(client, cluster, True, resources,
                        {"torch_threads": threads,
                         "gpus_per_host": opts.gpus if opts.gpus > 1 else 0},
                        f"SLURM: {jobs} job(s) of {opts.cores} cores, {opts.memory}"
                        + (f", {opts.gpus} GPU(s)" if opts.gpus else "")
                        + " (workers join as the jobs start)")
    raise ValueError(f"unknown cluster kind {choice.kind!r}")


def _dashboard(client) -> str | None:
    try:
        if "dashboard" in client.scheduler_info().get("services", {}):
            return client.dashboard_link
    except Exception:  # noqa: BLE001 - the link is a courtesy
        return None
    return None


# --------------------------------------------------------------------------------------------
# The run


def model_folder(model: str | os.PathLike | None) -> Path:
    """The absolute folder of the model the workers will load (checked here, on the client)."""
    from wsiproto.segment.predictor import resolve_model_dir

    return resolve_model_dir(model)


def run_key(folder: Path, device: str, precision: str, tta: bool,
            options: SegmentOptions) -> str:
    """What must match for an earlier ``done`` to count without asking a worker."""
    from wsiproto.segment import SCHEMA, config_hash
    from wsiproto.segment.predictor import weights_digest

    return config_hash({
        "model": str(folder), "weights": weights_digest(folder), "device": device,
        "precision": precision, "tta": tta, "options": options.output_config(),
        "schema": SCHEMA,
    })


def _is_complete(row: dict, slide: Path, out: Path, key: str) -> bool:
    if row.get("status") != "done" or row.get("run_key") != key or not row.get("config_hash"):
        return False
    try:
        st = slide.stat()
        if str(st.st_size) != row.get("slide_bytes") or str(st.st_mtime_ns) != row.get("slide_mtime_ns"):
            return False
        summary = json.loads((out / output_stem(slide) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("config_hash") == row["config_hash"]


@dataclass
class CohortResult:
    """What a run did: per-status counts over the slides of this run, where things are."""

    out: Path
    slides: list[str]
    counts: dict[str, int]
    ran: int  # slides processed by workers in this run
    already_done: int  # slides found complete from earlier runs (not submitted)
    wall_s: float
    work_s: float  # from the cluster being up to the last result
    manifest: Path
    cohort_csv: Path
    failed: list[tuple[str, str]]  # (slide, one-line reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stopped_early: bool = False
    description: str = ""

    @property
    def all_done(self) -> bool:
        return self.counts.get("done", 0) == len(self.slides)

    @property
    def slides_per_hour(self) -> float:
        return 3600.0 * self.ran / self.work_s if self.work_s > 0 else 0.0


def run_cohort(
    inputs: Sequence[str | os.PathLike],
    options: SegmentOptions,
    *,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    batch_size: int | None = None,
    cluster: ClusterChoice | None = None,
    client: Any = None,
    skip_errors: bool = False,
    retries: int = 1,
    echo: Callable[[str], None] | None = None,
    progress: bool = True,
) -> CohortResult:
    """Segment every slide of ``inputs`` into ``options.out``; see the module docstring.

    ``client``: an existing :class:`distributed.Client` to use as is (its workers should run
    one thread each; tests and notebooks pass one); otherwise ``cluster`` says what to start.
    Without ``skip_errors`` the first slide that fails for good stops the run (slides in flight
    are cancelled; their finished chunks are kept for the next run). ``retries``: extra
    attempts for failures other than :class:`WsiprotoError`.
    """
    import sys

    echo = echo or (lambda m: print(f"wsiproto: {m}", file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    out = Path(options.out).expanduser().absolute()
    from wsiproto.segment.folder import ensure_writable

    ensure_writable(out)
    slides = discover_slides(inputs, exclude=out)
    folder = model_folder(model)
    key = run_key(folder, device, precision, tta, options)
    options = dataclasses.replace(options, out=out, quiet=True)

    lock = _FolderLock(out)
    lock.acquire()
    session: _Session | None = None
    try:
        manifest = Manifest(out)
        counts = {s: 0 for s in STATUSES}
        owner: dict[str, str] = {}
        todo: list[str] = []
        already = 0
        for path in slides:
            slide = str(path)
            stem = output_stem(path)
            if stem in owner:
                manifest.update(slide, status="skipped", outputs="", error=(
                    f"{slide}: writes the same output folder {stem}/ as {owner[stem]}; "
                    "rename one of them or run it with another --out"), traceback="")
                counts["skipped"] += 1
                continue
            owner[stem] = slide
            if not options.overwrite and _is_complete(manifest.get(slide), path, out, key):
                counts["done"] += 1
                already += 1
                continue
            todo.append(slide)
        manifest.save(force=True)
        if already:
            echo(f"{already} of {len(slides)} slide(s) already done for this configuration "
                 "(skipped)")

        skipped = [(s, manifest.get(s)["error"]) for s in map(str, slides)
                   if manifest.get(s).get("status") == "skipped"]
        failed: list[tuple[str, str]] = []
        ran = 0
        stopped = False
        work_t0 = time.perf_counter()
        description = ""
        if todo:
            if client is not None:
                session = _Session(client, None, False, None, {}, "given client")
            else:
                session = _start(cluster or ClusterChoice(), device, len(todo), echo)
            description = session.description
            echo(description)
            link = _dashboard(session.client)
            if link:
                echo(f"dask dashboard: {link}")
            spec = WorkerSpec(model=str(folder), device=device, precision=precision, tta=tta,
                              batch_size=batch_size, **session.spec_updates)
            work_t0 = time.perf_counter()
            ran, stopped = _process(session, todo, spec, options, manifest, key, counts, failed,
                                    skip_errors, retries, echo, progress)
        work_s = time.perf_counter() - work_t0
    finally:
        try:
            if session is not None:
                session.close()
        finally:
            if "manifest" in locals():
                manifest.save(force=True)
            lock.release()

    csv_path = write_cohort_csv(out, manifest)
    return CohortResult(
        out=out, slides=[str(s) for s in slides], counts=counts, ran=ran, already_done=already,
        wall_s=time.perf_counter() - t_start, work_s=work_s, manifest=manifest.path,
        cohort_csv=csv_path, failed=failed, skipped=skipped, stopped_early=stopped,
        description=description,
    )


def _process(session: _Session, todo: list[str], spec: WorkerSpec, options: SegmentOptions,
             manifest: Manifest, key: str, counts: dict, failed: list, skip_errors: bool,
             retries: int, echo, progress: bool) -> tuple[int, bool]:
    """Submit one task per slide, collect results as they come, resubmit transient failures."""
    from distributed import as_completed

    client = session.client
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="cohort", unit="slide", dynamic_ncols=True)
    say = (lambda m: bar.write(f"wsiproto: {m}")) if bar is not None else echo
    attempts: dict[str, int] = {}
    slide_of: dict[str, str] = {}
    ran = 0

    def submit(slide: str):
        attempts[slide] = attempts.get(slide, 0) + 1
        token = hashlib.sha1(f"{slide}|{attempts[slide]}|{time.time_ns()}".encode()).hexdigest()[:8]
        fut = client.submit(segment_task, slide, spec, options, pure=False, retries=0,
                            resources=session.resources,
                            key=f"segment-{output_stem(slide)}-{token}")
        slide_of[fut.key] = slide
        return fut

    futures = [submit(s) for s in todo]
    pending = set(futures)
    ac = as_completed(futures)
    stopped = False
    try:
        for fut in ac:
            pending.discard(fut)
            slide = slide_of[fut.key]
            if fut.status == "error":
                exc = fut.exception()
                tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                reason = _one_line(exc)
                if type(exc).__name__ == "KilledWorker":
                    reason = ("the workers running this slide died repeatedly (out of memory? "
                              "see the worker logs): " + reason)
                res = {"status": "failed", "error": reason, "traceback": tb,
                       "permanent": type(exc).__name__ == "KilledWorker"}
            elif fut.status == "cancelled":
                continue
            else:
                res = fut.result()
            fut.release()
            if res["status"] == "failed" and not res.get("permanent") \
                    and attempts[slide] <= retries:
                say(f"retrying {slide} (attempt {attempts[slide] + 1} of {retries + 1}): "
                    f"{res['error']}")
                new = submit(slide)
                pending.add(new)
                ac.add(new)
                continue
            ran += res["status"] == "done"
            _record(manifest, slide, res, attempts[slide], key, options.out)
            counts[res["status"]] += 1
            if bar is not None:
                bar.update(1)
            say(_slide_line(slide, res))
            if res["status"] == "failed":
                failed.append((slide, res["error"]))
                if not skip_errors:
                    stopped = True
                    break
            manifest.save()
    finally:
        if pending:
            client.cancel(list(pending), force=True)
        if bar is not None:
            bar.close()
    return ran, stopped


def _record(manifest: Manifest, slide: str, res: dict, attempts: int, key: str, out: Path) -> None:
    stem = output_stem(slide)
    try:
        st = Path(slide).stat()
        ident = {"slide_bytes": st.st_size, "slide_mtime_ns": st.st_mtime_ns}
    except OSError:
        ident = {"slide_bytes": "", "slide_mtime_ns": ""}
    common = dict(status=res["status"], attempts=attempts, worker=res.get("worker", ""),
                  started=res.get("started", ""), finished=res.get("finished", _now()),
                  duration_s=res.get("duration_s"), model_load_s=res.get("model_load_s"),
                  **ident)
    if res["status"] == "done":
        outs = res.get("outputs", {})
        files = [outs.get(k) for k in ("ome_zarr", "geojson", "overlay") if outs.get(k)]
        manifest.update(slide, **common, outputs=";".join(f"{stem}/{f}" for f in
                                                          files + ["summary.json"]),
                        config_hash=res["config_hash"], run_key=key,
                        segment_s=res.get("segment_s"), error="", traceback="")
    else:
        tb_dir = out / TRACEBACKS
        tb_dir.mkdir(exist_ok=True)
        tb_file = tb_dir / f"{stem}.txt"
        write_text_atomic(tb_file, f"{slide}\n{res.get('worker', '')} {res.get('finished', '')}\n\n"
                               f"{res.get('traceback', '')}")
        manifest.update(slide, **common, outputs="", config_hash="", run_key="",
                        segment_s="", error=res["error"],
                        traceback=str(tb_file.relative_to(out)))


def _slide_line(slide: str, res: dict) -> str:
    if res["status"] == "done":
        if res.get("already_complete"):
            return f"done   {slide} (already complete)"
        pct = res.get("class_percent_of_tissue") or {}
        top = ", ".join(f"{k} {v:.0f}%" for k, v in
                        sorted(pct.items(), key=lambda kv: -kv[1])[:3])
        extra = ", resumed" if res.get("resumed") else ""
        return (f"done   {slide} ({res.get('duration_s', 0):.1f} s{extra}; tissue "
                f"{res.get('tissue_area_mm2') or 0:.2f} mm^2; {top})")
    error = res["error"]
    return f"FAILED {error if error.startswith(slide) else f'{slide}: {error}'}"


# --------------------------------------------------------------------------------------------
# Results


def write_cohort_csv(out: Path, manifest: Manifest) -> Path:
    """``OUT/cohort.csv``: one row per slide of the manifest (every run into this folder) with
    status, tissue area and per-class area in mm^2 and % of tissue from its ``summary.json``."""
    rows = []
    classes: list[str] = []
    for slide in manifest.rows:
        row = manifest.get(slide)
        rec: dict[str, Any] = {"slide": slide, "status": row.get("status", ""),
                               "error": row.get("error", "")}
        if row.get("status") == "done":
            try:
                summary = json.loads((out / output_stem(slide) / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
            rec["tissue_area_mm2"] = summary.get("tissue_area_mm2", "")
            for name, mm2 in summary.get("class_area_mm2", {}).items():
                if name not in classes:
                    classes.append(name)
                rec[f"{name}_mm2"] = round(float(mm2), 6)
                rec[f"{name}_pct"] = summary.get("class_percent_of_tissue", {}).get(name, "")
        rows.append(rec)
    fields = ["slide", "status", "tissue_area_mm2"]
    for name in classes:
        fields += [f"{name}_mm2", f"{name}_pct"]
    fields.append("error")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    path = out / COHORT_CSV
    write_text_atomic(path, buf.getvalue())
    return path


def format_summary(result: CohortResult, max_rows: int = 40) -> str:
    """The table printed at the end of a run: one row per slide (the first ``max_rows``), the
    counts, the throughput and where the manifest and class areas are."""
    mine = set(result.slides)
    with open(result.cohort_csv, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide"] in mine]
    classes = [f[:-4] for f in (rows[0].keys() if rows else []) if f.endswith("_pct")]
    width = min(48, max([len(Path(r["slide"]).name) for r in rows] + [5]))
    head = f"{'slide':<{width}}  {'status':<7} {'tissue mm2':>10}" + "".join(
        f" {c[:7] + ' %':>9}" for c in classes)
    lines = [head, "-" * len(head)]
    for r in rows[:max_rows]:
        name = Path(r["slide"]).name
        name = name if len(name) <= width else "..." + name[-(width - 3):]
        tissue = f"{float(r['tissue_area_mm2']):.2f}" if r.get("tissue_area_mm2") else "-"
        pcts = "".join(f" {float(r[c + '_pct']):>9.1f}" if r.get(c + "_pct") else f" {'-':>9}"
                       for c in classes)
        lines.append(f"{name:<{width}}  {r['status']:<7} {tissue:>10}{pcts}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more in {result.cohort_csv}")
    c = result.counts
    lines.append("")
    lines.append(f"{len(result.slides)} slide(s): {c.get('done', 0)} done "
                 f"({result.ran} run now, {result.already_done} already done), "
                 f"{c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped"
                 + (" - stopped at the first failure (--skip-errors goes on)"
                    if result.stopped_early else ""))
    if result.ran:
        lines.append(f"{result.ran} slide(s) in {result.work_s:.1f} s = "
                     f"{result.slides_per_hour:.0f} slides/hour (wall {result.wall_s:.1f} s "
                     "with cluster start)")
    for slide, reason in result.failed[:20]:
        lines.append(f"  failed: {reason if reason.startswith(slide) else f'{slide}: {reason}'}")
    for slide, reason in result.skipped[:20]:
        lines.append(f"  skipped: {reason}")
    if len(result.failed) > 20:
        lines.append(f"  ... {len(result.failed) - 20} more failures in {result.manifest}")
    lines.append(f"manifest: {result.manifest}")
    lines.append(f"class areas: {result.cohort_csv}")
    return "\n".join(lines)


__all__ = [
    "MANIFEST_FIELDS",
    "SLIDE_SUFFIXES",
    "ClusterChoice",
    "CohortResult",
    "Manifest",
    "SlurmOptions",
    "WorkerSpec",
    "discover_slides",
    "format_summary",
    "local_workers",
    "model_folder",
    "output_stem",
    "run_cohort",
    "run_key",
    "segment_task",
    "slurm_cluster",
    "worker_model",
    "write_cohort_csv",
]
