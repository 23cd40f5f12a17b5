"""Cohorts: thousands of slides through :func:`~wsiproto.segment.segment_slide` on a
dask.distributed cluster, resumable, with one manifest row per slide and a page to look at.

Modules, one concern each:

- :mod:`~wsiproto.cohort.inputs`: slides from files, folders and CSVs; each slide's folder
  strictly inside ``OUT`` (renamed when two slides would share one, recorded in the manifest).
- :mod:`~wsiproto.cohort.manifest`: ``OUT/manifest.csv`` (journal + compaction: flat cost per
  slide) and the lock that keeps one cohort run per ``OUT``.
- :mod:`~wsiproto.cohort.cluster`: local cluster, existing scheduler or SLURM (one function per
  kind); servers on 127.0.0.1 unless asked otherwise.
- :mod:`~wsiproto.cohort.worker`: the task run on a worker for one slide, one model per worker.
- :mod:`~wsiproto.cohort.run`: plan, submit, handle results, retries and lost workers.
- :mod:`~wsiproto.cohort.report` (``cohort.csv``, the summary printed at the end) and
  :mod:`~wsiproto.cohort.page` (``report.html``).

Memory: a worker holds one model and one slide in flight; ``segment_slide`` bounds a slide's
memory by chunk size x chunks in flight (``SegmentOptions.workers``), never by slide size.
"""

from wsiproto.cohort.cluster import ClusterChoice, SlurmOptions, local_workers, slurm_cluster
from wsiproto.cohort.inputs import SlideFolder, assign_folders, discover_slides, folder_suffixes
from wsiproto.cohort.manifest import FIELDS as MANIFEST_FIELDS
from wsiproto.cohort.manifest import CohortLock, Manifest
from wsiproto.cohort.report import format_summary, write_cohort_csv
from wsiproto.cohort.run import CohortResult, run_cohort, run_key
from wsiproto.cohort.worker import WorkerSpec, segment_task, worker_model

__all__ = [
    "MANIFEST_FIELDS",
    "ClusterChoice",
    "CohortLock",
    "CohortResult",
    "Manifest",
    "SlideFolder",
    "SlurmOptions",
    "WorkerSpec",
    "assign_folders",
    "discover_slides",
    "folder_suffixes",
    "format_summary",
    "local_workers",
    "run_cohort",
    "run_key",
    "segment_task",
    "slurm_cluster",
    "worker_model",
    "write_cohort_csv",
]
