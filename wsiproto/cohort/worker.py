"""The worker side of a cohort: one task per slide, one model per worker process.

:func:`segment_task` runs on a dask worker: it takes the slide's *path* (slides are opened on
the worker, never sent from the client), loads the model once per worker process
(:func:`worker_model`), runs :func:`wsiproto.segment.segment_slide` and returns a small dict;
a slide's own failure is a result (``status: failed`` with a one-line reason), never an
exception. At its start the task logs an event (topic :data:`START_TOPIC`) with the attempt,
the worker and, inside a SLURM job, the job's id: the client counts attempts from these events
and, when a worker is lost mid-slide, asks SLURM why its job ended.

Threads: dask's nanny starts workers with ``OMP_NUM_THREADS=1``; the task sets torch's thread
count explicitly: cores / worker processes on the host (local), cores per job / processes per
job (SLURM), or the host's cores / the workers seen on that host (existing scheduler).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiproto.errors import WsiprotoError

START_TOPIC = "wsiproto-cohort-start"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its predictor (picklable, sent with every task).

    ``model``: an absolute model folder (must be visible to the workers, e.g. on a shared file
    system). ``gpus_per_host``: > 1 when several worker processes share a host with that many
    GPUs: each worker then takes GPU ``index % n`` where ``index`` is the number its name ends
    with. ``torch_threads``: intra-op threads for torch (None: the host's cores /
    ``workers_per_host[host]``). ``standin``: benchmarks only -- a cheap stand-in for the model
    (:class:`StandInPredictor`), so that the cohort machinery can be measured on thousands of
    slides without the model's cost; everything else runs as in a real cohort.
    """

    model: str
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    batch_size: int | None = None
    torch_threads: int | None = None
    gpus_per_host: int = 0
    workers_per_host: tuple[tuple[str, int], ...] = ()
    standin: bool = False

    def cache_key(self, device: str) -> tuple:
        return (self.model, device, self.precision, self.tta, self.batch_size, self.standin)


class StandInPredictor:
    """A model stand-in for benchmarks: the four BCSS classes from each pixel's colour (a few
    tensor operations per tile, on the CPU), 64 px tiles at 0.5 um/px."""

    tile_size = 64
    mpp = 0.5
    num_classes = 4
    classes = [("TUM", (255, 0, 0)), ("STR", (0, 255, 0)), ("LYM", (0, 0, 255)),
               ("NEC", (153, 0, 255))]
    background = ("background", (255, 255, 255))
    default_batch_size = 32
    device = "cpu"
    cuda = False

    def describe(self) -> dict:
        return {"name": "cohort-standin", "tile": self.tile_size, "mpp": self.mpp}

    def predict_scores(self, tiles):
        """uint8 tensor [N, t, t, 3] -> float32 tensor [N, 5, t, t]."""
        import torch

        x = tiles.permute(0, 3, 1, 2).float() / 255.0
        return torch.cat([x, x[:, :1] * x[:, 2:], 1.0 - x.mean(1, keepdim=True)], dim=1)


_MODELS: dict[tuple, tuple[Any, Any]] = {}
_MODELS_LOCK = threading.Lock()


def worker_identity() -> tuple[str, str]:
    """(worker address, worker name) inside a dask worker; ('', '') elsewhere."""
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.address), str(w.name)
    except (ImportError, ValueError):
        return "", ""


def worker_device(spec: WorkerSpec, name: str) -> str:
    if spec.device == "cpu" or spec.gpus_per_host <= 1:
        return spec.device
    m = re.search(r"(\d+)$", name)
    index = int(m.group(1)) if m else 0
    return f"cuda:{index % spec.gpus_per_host}"


def torch_threads(spec: WorkerSpec, address: str) -> int:
    if spec.torch_threads:
        return max(1, int(spec.torch_threads))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    host = address.split("://")[-1].rsplit(":", 1)[0]
    per_host = dict(spec.workers_per_host).get(host, 1)
    return max(1, cores // max(1, per_host))


def _load(spec: WorkerSpec, device: str, address: str):
    from wsiproto.segment.infer import BatchRunner

    if spec.standin:
        predictor = StandInPredictor()
    else:
        import torch

        from wsiproto.segment.predictor import load_predictor

        torch.set_num_threads(torch_threads(spec, address))
        predictor = load_predictor(spec.model, device=device, precision=spec.precision,
                                   tta=spec.tta)
    return predictor, BatchRunner(predictor,
                                  batch_size=spec.batch_size or predictor.default_batch_size)


def worker_model(spec: WorkerSpec) -> tuple[Any, Any, float]:
    """This worker process's (predictor, BatchRunner, seconds spent loading now).

    A module-level cache: the first task on a worker loads the model, later tasks reuse it and
    its inference thread. A task with a different spec (another cohort on the same long-lived
    cluster) replaces the cached model, so a worker never holds two.
    """
    address, name = worker_identity()
    device = worker_device(spec, name)
    key = spec.cache_key(device)
    with _MODELS_LOCK:
        if key in _MODELS:
            predictor, runner = _MODELS[key]
            return predictor, runner, 0.0
        t0 = time.perf_counter()
        for _, old_runner in _MODELS.values():
            old_runner.close()
        _MODELS.clear()
        _MODELS[key] = _load(spec, device, address)
        return (*_MODELS[key], time.perf_counter() - t0)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def one_line(exc: BaseException) -> str:
    """A failure's reason in one line: a WsiprotoError as it reads, others with their type."""
    if isinstance(exc, WsiprotoError):
        return str(exc)
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _announce(slide: str, attempt: str) -> None:
    """Tell the client (through the scheduler's event log) that this attempt has started."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(START_TOPIC, {
        "attempt": attempt, "slide": slide, "worker": str(worker.address), "time": time.time(),
        "job": os.environ.get("SLURM_JOB_ID", ""),
    })


def segment_task(slide: str, out: str, spec: WorkerSpec, options, attempt: str = "") -> dict:
    """The task run on a worker for one slide, written into ``out`` (its ``--out``); never
    raises for a slide's own failure.

    Returns a plain dict: ``status`` ("done" or "failed"), timings, where it ran, and either the
    summary's essentials with a small overlay thumbnail, or ``error`` (one line),
    ``traceback`` and ``permanent`` (True for a :class:`WsiprotoError`: retrying cannot help).
    """
    for name in ("tifffile", "tiffslide"):  # a damaged file's oddities: the manifest has why
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _announce(slide, attempt)
    address, _ = worker_identity()
    result: dict[str, Any] = {
        "slide": slide, "worker": address or f"{socket.gethostname()}:{os.getpid()}",
        "started": now(),
    }
    t0 = time.perf_counter()
    try:
        from wsiproto.segment import segment_slide

        predictor, runner, load_s = worker_model(spec)
        result["model_load_s"] = load_s
        opts = dataclasses.replace(options, out=Path(out), quiet=True,
                                   batch_size=runner.batch_size)
        with _Warnings() as warnings:
            run = segment_slide(slide, predictor, opts, runner=runner)
        result.update(_done(run), warnings=warnings.lines)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a manifest row
        result.update(status="failed", error=one_line(exc), traceback=traceback.format_exc(),
                      permanent=isinstance(exc, WsiprotoError))
    result["finished"] = now()
    result["duration_s"] = time.perf_counter() - t0
    return result


class _Warnings(logging.Handler):
    """wsiproto's warnings during one task, collected for the client (which prints them with
    the slide's line) instead of going to the worker's stderr on their own."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self._logger = logging.getLogger("wsiproto")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(" ".join(record.getMessage().split()))

    def __enter__(self) -> _Warnings:
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


def _done(run) -> dict:
    """The result fields of a finished :class:`~wsiproto.segment.SegmentResult`."""
    from wsiproto.cohort.page import class_colors, thumbnail_uri

    summary = run.summary
    return {
        "status": "done", "config_hash": summary["config_hash"],
        "already_complete": run.already_complete, "resumed": run.resumed,
        "chunks_resumed": run.chunks_resumed, "chunks_run": run.chunks_run,
        "segment_s": float(run.timings.get("total_s", 0.0)),
        "tissue_area_mm2": summary.get("tissue_area_mm2"),
        "class_percent_of_tissue": summary.get("class_percent_of_tissue", {}),
        "class_colors": class_colors(summary), "outputs": summary.get("outputs", {}),
        "thumbnail": thumbnail_uri(run.folder, summary),
    }


__all__ = ["START_TOPIC", "StandInPredictor", "WorkerSpec", "now", "one_line",
           "segment_task", "worker_model"]
