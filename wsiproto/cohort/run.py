"""The run: plan the slides, start the cluster, submit one task per slide, record the results.

How a run goes (:func:`run_cohort`):

1. **Plan**: the slides (:mod:`~wsiproto.cohort.inputs`) and their folders; the manifest of
   earlier runs. A slide whose row says ``done`` for the same *run key* (model weights digest +
   device/precision/TTA request + every option that changes outputs), whose file is unchanged
   (size, mtime) and whose ``summary.json`` still carries the recorded config hash is not
   submitted; every other slide gets the row ``queued``.
2. **Cluster** (:mod:`~wsiproto.cohort.cluster`) and one task per slide
   (:func:`~wsiproto.cohort.worker.segment_task`).
3. **Results**, handled on the client's one thread as they come (:class:`_Loop`): the row goes
   to the manifest, the entry to the report page, a failure's traceback to
   ``OUT/manifest-tracebacks/``. A :class:`~wsiproto.errors.WsiprotoError` (a bad slide) is
   final; another exception is retried ``retries`` times; a worker lost mid-slide (killed, out
   of memory, its SLURM job ended) costs an attempt too: the slide goes to another worker and
   resumes from its finished chunks.
4. **End**: the manifest and the page written in full, ``OUT/cohort.csv``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsiproto.cohort.cluster import ClusterChoice, Session, start
from wsiproto.cohort.inputs import SlideFolder, assign_folders, discover_slides
from wsiproto.cohort.layout import JOB_LOGS, TRACEBACKS
from wsiproto.cohort.manifest import CohortLock, Manifest
from wsiproto.cohort.page import ReportPage, entry_from_row
from wsiproto.cohort.report import write_cohort_csv
from wsiproto.cohort.worker import START_TOPIC, WorkerSpec, now, one_line, segment_task
from wsiproto.segment import SegmentOptions

TICK_S = 1.0  # the loop's wake-up when nothing happens: page writes, SLURM job replacement


@dataclass
class CohortResult:
    """What a run did: per-status counts over the slides of this run, where things are, and
    the client's own seconds per stage (``overhead_s``): ``plan``, ``submit``, ``results``
    (of which ``manifest`` and ``page_rows``), ``tick`` (of which ``page_writes``), ``close``
    (the cluster's shutdown), ``end`` (final manifest, page and cohort.csv)."""

    out: Path
    slides: list[str]
    counts: dict[str, int]
    ran: int  # slides processed by workers in this run
    already_done: int  # slides found complete from earlier runs (not submitted)
    wall_s: float
    work_s: float  # from the cluster being up to the last result
    manifest: Path
    cohort_csv: Path
    report: Path
    failed: list[tuple[str, str]]  # (slide, one-line reason)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)  # (slide, folder, why)
    stopped_early: bool = False
    description: str = ""
    dashboard: str | None = None
    overhead_s: dict[str, float] = field(default_factory=dict)

    @property
    def all_done(self) -> bool:
        return self.counts.get("done", 0) == len(self.slides)

    @property
    def slides_per_hour(self) -> float:
        return 3600.0 * self.ran / self.work_s if self.work_s > 0 else 0.0


def run_key(folder: Path, device: str, precision: str, tta: bool, options: SegmentOptions,
            standin: bool = False) -> str:
    """What must match for an earlier ``done`` to count without asking a worker."""
    from wsiproto.segment import SCHEMA, config_hash
    from wsiproto.segment.predictor import weights_digest

    model = {"standin": True} if standin else {"model": str(folder),
                                               "weights": weights_digest(folder)}
    return config_hash({**model, "device": device, "precision": precision, "tta": tta,
                        "options": options.output_config(), "schema": SCHEMA})


def is_complete(row: dict, slide: str, folder: Path, key: str) -> bool:
    """An earlier run finished ``slide`` into ``folder`` for this run key, and nothing
    changed since (slide size and mtime, the summary's config hash)."""
    if row.get("status") != "done" or row.get("run_key") != key or not row.get("config_hash"):
        return False
    try:
        st = os.stat(slide)
        if (str(st.st_size), str(st.st_mtime_ns)) != (row.get("slide_bytes"),
                                                      row.get("slide_mtime_ns")):
            return False
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("config_hash") == row["config_hash"]


def plan(manifest: Manifest, slides: list[Path], out: Path, key: str, overwrite: bool
         ) -> tuple[dict[str, SlideFolder], list[str], list[str]]:
    """(folders by slide, slides to run, slides already done); to-run slides become
    ``queued`` in the manifest."""
    previous = {s: (r.get("folder", ""), r.get("folder_note", ""))
                for s, r in manifest.rows.items() if r.get("folder")}
    folders = {f.slide: f for f in assign_folders(slides, previous)}
    todo, already = [], []
    for slide, where in folders.items():
        row = manifest.get(slide)
        if not overwrite and is_complete(row, slide, out / where.folder, key):
            already.append(slide)
            if (row.get("folder"), row.get("folder_note")) != (where.folder, where.note):
                manifest.update(slide, folder=where.folder, folder_note=where.note)
            continue
        todo.append(slide)
        manifest.update(slide, status="queued", folder=where.folder, folder_note=where.note,
                        outputs="", config_hash="", run_key="", error="", traceback="")
    return folders, todo, already


def _stderr(message: str) -> None:
    print(f"wsiproto: {message}", file=sys.stderr, flush=True)


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
    standin: bool = False,
) -> CohortResult:
    """Segment every slide of ``inputs`` into ``options.out``; see the module docstring.

    ``client``: an existing :class:`distributed.Client` to use as is (its workers should run
    one thread each; tests and notebooks pass one); otherwise ``cluster`` says what to start.
    Without ``skip_errors`` the first slide that fails for good stops the run (slides in flight
    are cancelled; their finished chunks are kept for the next run). ``retries``: extra
    attempts for a slide whose worker was lost or that failed with an error other than
    :class:`WsiprotoError`. ``progress``: a line per finished slide (and a bar on a terminal).
    ``standin``: benchmarks only (see :class:`~wsiproto.cohort.worker.WorkerSpec`).
    """
    from wsiproto.segment.folder import ensure_writable
    from wsiproto.segment.predictor import resolve_model_dir

    echo = echo or _stderr
    t_start = time.perf_counter()
    out = Path(options.out).expanduser().absolute()
    ensure_writable(out)
    slides = discover_slides(inputs, exclude=out)
    model_dir = resolve_model_dir(model)
    key = run_key(model_dir, device, precision, tta, options, standin)
    options = dataclasses.replace(options, out=out, quiet=True)
    spec = WorkerSpec(model=str(model_dir), device=device, precision=precision, tta=tta,
                      batch_size=batch_size, standin=standin)
    with CohortLock(out):
        manifest = Manifest(out)
        try:
            return _run(slides, out, key, spec, options, manifest, cluster, client, skip_errors,
                        retries, echo, progress, t_start)
        finally:
            manifest.close()


def _run(slides, out, key, spec, options, manifest, choice, client, skip_errors, retries, echo,
         progress, t_start) -> CohortResult:
    overhead: Counter = Counter()
    t0 = time.perf_counter()
    folders, todo, already = plan(manifest, slides, out, key, options.overwrite)
    manifest.compact()
    page = _open_page(manifest, out)
    overhead["plan"] += time.perf_counter() - t0
    if already:
        echo(f"{len(already)} of {len(slides)} slide(s) already done for this configuration "
             "(skipped)")
    session: Session | None = None
    loop = None
    link = None
    work_t0 = time.perf_counter()
    try:
        if todo:
            session = _session(choice, client, out, spec.device, len(todo), retries, echo)
            link = session.dashboard()
            if link:
                echo(f"dask dashboard: {link}")
            spec = dataclasses.replace(spec, **session.spec_updates)
            loop = _Loop(session, spec, options, manifest, page, folders, key, skip_errors,
                         retries, echo, progress, overhead)
            work_t0 = time.perf_counter()
            loop.run(todo)
        work_s = time.perf_counter() - work_t0
    finally:
        t0 = time.perf_counter()
        try:
            if session is not None:
                session.close()
        finally:
            overhead["close"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            manifest.compact()
            page.write(force=True)
    csv_path = write_cohort_csv(out, manifest)
    overhead["end"] += time.perf_counter() - t0
    overhead["page_writes"] = page.write_s
    statuses = Counter(manifest.get(str(s)).get("status", "queued") for s in slides)
    return CohortResult(
        out=out, slides=[str(s) for s in slides], counts=dict(statuses),
        ran=loop.ran if loop else 0, already_done=len(already),
        wall_s=time.perf_counter() - t_start, work_s=work_s, manifest=manifest.path,
        cohort_csv=csv_path, report=page.path, failed=loop.failed if loop else [],
        renamed=[(f.slide, f.folder, f.note) for f in folders.values() if f.note],
        stopped_early=bool(loop and loop.stopped),
        description=session.description if session else "",
        dashboard=link, overhead_s=dict(overhead),
    )


def _open_page(manifest: Manifest, out: Path) -> ReportPage:
    """The report page with a row per manifest row, written once before the run."""
    page = ReportPage(out)
    for row in manifest.rows.values():
        page.set(entry_from_row(row, out))
    page.write(force=True)
    return page


def _session(choice, client, out: Path, device: str, n: int, retries: int, echo) -> Session:
    """The given client as it is, else the cluster ``choice`` asks for."""
    if client is not None:
        session = Session(client, description="given client")
    else:
        session = start(_with_job_logs(choice or ClusterChoice(), out), device, n, retries, echo)
    echo(session.description)
    return session


class _Loop:
    """Submits one task per slide and handles what comes back, all on the calling thread:
    task results (through done-callbacks) and attempt starts (through the scheduler's event
    log) arrive on one queue; every :data:`TICK_S` without news the page and SLURM jobs are
    looked after."""

    def __init__(self, session: Session, spec: WorkerSpec, options: SegmentOptions,
                 manifest: Manifest, page: ReportPage, folders: dict[str, SlideFolder],
                 key: str, skip_errors: bool, retries: int, echo, progress: bool,
                 overhead: Counter):
        self.session, self.spec, self.options = session, spec, options
        self.manifest, self.page, self.folders, self.key = manifest, page, folders, key
        self.skip_errors, self.retries, self.echo = skip_errors, retries, echo
        self.progress, self.overhead = progress, overhead
        self.news: queue.Queue = queue.Queue()
        self.pending: dict[str, Any] = {}  # task key -> future
        self.slide_of: dict[str, str] = {}  # task key -> slide
        self.starts: dict[str, list[dict]] = {}  # task key -> its attempts' start events
        self.tries: Counter = Counter()  # slide -> attempts started
        self.resubmits: Counter = Counter()  # slide -> resubmissions after an error
        self.ran = 0
        self.finished = 0
        self.total = 0
        self.failed: list[tuple[str, str]] = []
        self.stopped = False
        self.bar = None
        self._last_tick = 0.0

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"wsiproto: {message}", file=sys.stderr)
        else:
            self.echo(message)

    def submit(self, slide: str) -> None:
        t0 = time.perf_counter()
        where = self.folders[slide]
        token = hashlib.sha1(f"{slide}|{time.time_ns()}".encode()).hexdigest()[:8]
        key = f"segment-{where.folder.rsplit('/', 1)[-1]}-{token}"
        fut = self.session.client.submit(
            segment_task, slide, str(where.out(self.options.out)), self.spec, self.options, key,
            key=key, pure=False, retries=0, resources=self.session.resources)
        self.pending[key] = fut
        self.slide_of[key] = slide
        fut.add_done_callback(lambda f: self.news.put(("result", f.key)))
        self.overhead["submit"] += time.perf_counter() - t0

    def run(self, todo: list[str]) -> None:
        client = self.session.client
        self.total = len(todo)
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="cohort", unit="slide", dynamic_ncols=True)
        client.subscribe_topic(START_TOPIC, lambda event: self.news.put(("start", event[1])))
        try:
            for slide in todo:
                self.submit(slide)
            while self.pending and not self.stopped:
                news = self.wait_news()
                for event in (item for kind, item in news if kind == "start"):
                    self.on_start(event)
                self.on_results([item for kind, item in news if kind == "result"])
                self.tick()
        finally:
            client.unsubscribe_topic(START_TOPIC)
            if self.pending:
                client.cancel(list(self.pending.values()), force=True)
            if self.bar is not None:
                self.bar.close()

    def tick(self) -> None:
        t0 = time.perf_counter()
        self.page.write()
        if t0 - self._last_tick >= 2.0:
            self._last_tick = t0
            self.session.tick()
            self.manifest.maybe_compact()
        self.overhead["tick"] += time.perf_counter() - t0

    def lost(self, event: dict) -> tuple[str, str]:
        """(why the attempt of ``event`` was lost, what to do) in words."""
        reason, hint = self.session.lost_reason(event.get("job", ""))
        return (reason or f"its worker {event.get('worker', '?')} died (killed, or out of "
                          "memory?)", hint or "see the worker logs")

    def on_start(self, event: dict) -> None:
        key = event.get("attempt", "")
        if key not in self.pending:
            return
        slide = self.slide_of[key]
        self.tries[slide] += 1
        starts = self.starts.setdefault(key, [])
        starts.append(event)
        if len(starts) > 1:
            reason, _ = self.lost(starts[-2])
            self.say(f"{slide}: {reason}; resuming on {event.get('worker', '?')}")

    def wait_news(self) -> list[tuple[str, Any]]:
        """What arrived: the first item within :data:`TICK_S`, and all that came with it."""
        try:
            news = [self.news.get(timeout=TICK_S)]
        except queue.Empty:
            return []
        while True:
            try:
                news.append(self.news.get_nowait())
            except queue.Empty:
                return news

    def on_results(self, keys: list[str]) -> None:
        """Handle finished tasks; their results come from the workers in one round trip."""
        t0 = time.perf_counter()
        futures = {k: self.pending.pop(k) for k in keys if k in self.pending}
        futures = {k: f for k, f in futures.items() if f.status != "cancelled"}
        ok = [k for k, f in futures.items() if f.status == "finished"]
        values = dict(zip(ok, self.session.client.gather([futures[k] for k in ok],
                                                         errors="skip")))
        for key, fut in futures.items():
            slide = self.slide_of.pop(key)
            if key not in values and fut.status != "error":  # its result was lost with its
                fut.release()  # worker before it could be read: again (it is complete now)
                self.submit(slide)
                continue
            res = values[key] if key in values else self.error_result(key, slide, fut)
            fut.release()
            if res["status"] == "failed" and not res.get("permanent") \
                    and self.resubmits[slide] < self.retries:
                self.resubmits[slide] += 1
                self.say(f"retrying {slide} (attempt {self.tries[slide] + 1}): {res['error']}")
                self.submit(slide)
            else:
                self.record(slide, res)
            self.starts.pop(key, None)
        self.overhead["results"] += time.perf_counter() - t0

    def error_result(self, key: str, slide: str, fut) -> dict:
        """The result of a task that raised instead of returning: its workers were lost
        (``KilledWorker``) or the task could not run at all."""
        import traceback

        exc = fut.exception()
        tb = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
        if type(exc).__name__ != "KilledWorker":
            return {"status": "failed", "error": one_line(exc), "traceback": tb}
        starts = self.starts.get(key) or [{}]
        reason, hint = self.lost(starts[-1])
        tries = f" ({len(starts)} attempts)" if len(starts) > 1 else ""
        return {"status": "failed", "error": f"{slide}: {reason}{tries}; {hint}",
                "traceback": tb, "permanent": True, "finished": now()}

    def record(self, slide: str, res: dict) -> None:
        t0 = time.perf_counter()
        where = self.folders[slide]
        common = {"status": res["status"], "attempts": max(1, self.tries[slide]),
                  "worker": res.get("worker", ""), "started": res.get("started", ""),
                  "finished": res.get("finished", now()), "duration_s": res.get("duration_s"),
                  "model_load_s": res.get("model_load_s"), **_identity(slide)}
        if res["status"] == "done":
            files = [res["outputs"].get(k) for k in ("ome_zarr", "geojson", "overlay")]
            outputs = ";".join(f"{where.folder}/{f}" for f in files + ["summary.json"] if f)
            row = self.manifest.update(slide, **common, outputs=outputs,
                                       config_hash=res["config_hash"], run_key=self.key,
                                       segment_s=res.get("segment_s"), error="", traceback="")
            self.ran += 1
        else:
            row = self.manifest.update(slide, **common, outputs="", config_hash="", run_key="",
                                       segment_s="", error=res["error"],
                                       traceback=self.save_traceback(slide, where, res))
            self.failed.append((slide, res["error"]))
            self.stopped = not self.skip_errors
            _remove_empty_parent(self.options.out, where)
        t1 = time.perf_counter()
        self.page.set(entry_from_row(row, self.options.out, res))
        self.overhead["manifest"] += t1 - t0
        self.overhead["page_rows"] += time.perf_counter() - t1
        self.finished += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.progress:
            self.say(f"[{self.finished}/{self.total}] {slide_line(slide, res)}")
            for line in res.get("warnings", []):
                self.say(f"warning: {line}")

    def save_traceback(self, slide: str, where: SlideFolder, res: dict) -> str:
        from wsiproto.files import write_text_atomic

        folder = self.options.out / TRACEBACKS
        folder.mkdir(exist_ok=True)
        path = folder / f"{where.folder.replace('/', '--')}.txt"
        write_text_atomic(path, f"{slide}\n{res.get('worker', '')} {res.get('finished', '')}\n\n"
                                f"{res.get('traceback', '')}")
        return f"{TRACEBACKS}/{path.name}"


def _with_job_logs(choice: ClusterChoice, out: Path) -> ClusterChoice:
    """SLURM job logs go to ``OUT/slurm-logs`` unless a folder was given (not to the
    current folder, SLURM's default)."""
    if choice.kind != "slurm" or (choice.slurm and choice.slurm.log_directory):
        return choice
    from wsiproto.cohort.cluster import SlurmOptions

    slurm = dataclasses.replace(choice.slurm or SlurmOptions(), log_directory=str(out / JOB_LOGS))
    return dataclasses.replace(choice, slurm=slurm)


def _identity(slide: str) -> dict:
    try:
        st = os.stat(slide)
        return {"slide_bytes": st.st_size, "slide_mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"slide_bytes": "", "slide_mtime_ns": ""}


def _remove_empty_parent(out: Path, where: SlideFolder) -> None:
    """A failed slide of a nested folder leaves no empty ``OUT/<name>-<hash>/`` behind."""
    parent = where.folder.rpartition("/")[0]
    if parent:
        try:
            (out / parent).rmdir()
        except OSError:
            pass


def slide_line(slide: str, res: dict) -> str:
    if res["status"] == "done":
        if res.get("already_complete"):
            return f"done   {slide} (already complete)"
        pct = res.get("class_percent_of_tissue") or {}
        top = ", ".join(f"{k} {v:.0f}%" for k, v in
                        sorted(pct.items(), key=lambda kv: -kv[1])[:3])
        extra = f", resumed {res['chunks_resumed']} chunk(s)" if res.get("resumed") else ""
        return (f"done   {slide} ({res.get('duration_s', 0):.1f} s{extra}; tissue "
                f"{res.get('tissue_area_mm2') or 0:.2f} mm^2; {top})")
    error = res["error"]
    return f"FAILED {error if error.startswith(slide) else f'{slide}: {error}'}"


__all__ = ["CohortResult", "is_complete", "plan", "run_cohort", "run_key", "slide_line"]
