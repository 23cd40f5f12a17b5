"""The names a cohort gives its own files inside ``OUT``, beside the slides' folders.

Slide folders never take one of these names (:func:`wsiproto.cohort.inputs.assign_folders`).
"""

MANIFEST = "manifest.csv"  # one row per slide, rewritten atomically from time to time
JOURNAL = "manifest-journal.csv"  # rows since the last rewrite, appended as slides finish
TRACEBACKS = "manifest-tracebacks"  # a failed slide's full traceback, one file per slide
COHORT_CSV = "cohort.csv"  # per-slide tissue and class areas
REPORT = "report.html"  # the page to look at
LOCK = ".cohort.lock"  # one cohort run per OUT at a time
JOB_LOGS = "slurm-logs"  # SLURM job logs, unless --slurm-log-directory says otherwise

OWN_NAMES = (MANIFEST, JOURNAL, TRACEBACKS, COHORT_CSV, REPORT, LOCK, JOB_LOGS)
