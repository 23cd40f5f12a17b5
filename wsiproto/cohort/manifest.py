"""``OUT/manifest.csv``: one row per slide, and the lock that keeps one cohort run per ``OUT``.

Only the client writes the manifest. A row that changes is appended at once to
``OUT/manifest-journal.csv`` (one ``write`` of a whole CSV line, flushed); from time to time the
rows are folded into ``manifest.csv`` (written to a temporary file and renamed over it) and the
journal starts afresh. The cost per slide stays flat however large the cohort: a rewrite
happens only once the journal holds a quarter as many rows as the manifest (or after
``compact_every_s`` with a non-empty journal), so the rows written per slide are bounded by a
constant. A reader -- :class:`Manifest` itself on the next run -- takes ``manifest.csv`` and then
the journal's rows, the later row of a slide winning; a journal line cut short by a crash is
ignored. A crash between the rename and the journal's removal replays rows that are already in
``manifest.csv``, which changes nothing.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

from wsiproto.cohort.layout import JOURNAL, LOCK, MANIFEST
from wsiproto.errors import WsiprotoError

FIELDS = (
    "slide", "status", "folder", "folder_note", "outputs", "config_hash", "run_key",
    "slide_bytes", "slide_mtime_ns", "attempts", "worker", "started", "finished", "duration_s",
    "model_load_s", "segment_s", "error", "traceback",
)
STATUSES = ("done", "failed")


def _csv_line(row: dict[str, str]) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n").writerow(row)
    return buf.getvalue()


class Manifest:
    """The rows of ``OUT/manifest.csv`` (:data:`FIELDS`), keyed by the slide's absolute path;
    rows of slides that are not part of this run are kept as they are."""

    def __init__(self, folder: str | os.PathLike, compact_every_s: float = 60.0,
                 min_compact_rows: int = 64):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.journal_path = self.folder / JOURNAL
        self.compact_every_s = compact_every_s
        self.min_compact_rows = min_compact_rows
        self.rows: dict[str, dict[str, str]] = {}
        self.journal_rows = 0  # rows appended since the last rewrite
        self.rewrites = 0
        self.rows_rewritten = 0  # rows written by all rewrites (bounded by a constant x updates)
        self._journal = None
        self._last_compact = time.monotonic()
        self._read(self.path, journal=False)
        self._read(self.journal_path, journal=True)

    def _read(self, path: Path, journal: bool) -> None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise WsiprotoError(f"cannot read the manifest ({exc.strerror or exc})", path=path,
                                hint="fix its permissions, or move it away to start afresh") \
                from exc
        if journal:
            data = data[: data.rfind(b"\n") + 1]  # a line cut short by a crash: not a row
        try:
            for row in csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")):
                if row.get("slide") and None not in row.values():
                    self.rows[row["slide"]] = {k: row.get(k) or "" for k in FIELDS}
                    self.journal_rows += journal
        except (UnicodeDecodeError, csv.Error) as exc:
            raise WsiprotoError(f"not a readable manifest ({exc})", path=path,
                                hint="move it away to start the cohort afresh") from exc

    def get(self, slide: str) -> dict[str, str]:
        return self.rows.get(slide, {})

    def update(self, slide: str, **values: Any) -> dict[str, str]:
        """Change a slide's row and append it to the journal; rewrite ``manifest.csv`` when the
        journal has grown enough (see the module doc)."""
        row = dict(self.rows.get(slide) or {k: "" for k in FIELDS})
        row["slide"] = slide
        for k, v in values.items():
            if k not in FIELDS:
                raise KeyError(k)
            row[k] = "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        self.rows[slide] = row
        self._append(row)
        self.maybe_compact()
        return row

    def _append(self, row: dict[str, str]) -> None:
        if self._journal is None:
            self._journal = open(self.journal_path, "a", encoding="utf-8", newline="")
            if self._journal.tell() == 0:
                self._journal.write(",".join(FIELDS) + "\n")
            else:  # drop a partial last line, so that the next row starts on its own line
                size = self.journal_path.stat().st_size
                with open(self.journal_path, "rb") as fh:
                    fh.seek(max(0, size - 1))
                    if fh.read(1) != b"\n":
                        self._journal.write("\n")
        self._journal.write(_csv_line(row))
        self._journal.flush()
        self.journal_rows += 1

    def maybe_compact(self) -> bool:
        due = self.journal_rows >= max(self.min_compact_rows, len(self.rows) // 4)
        stale = self.journal_rows and time.monotonic() - self._last_compact >= self.compact_every_s
        if due or stale:
            self.compact()
        return bool(due or stale)

    def compact(self) -> None:
        """Write every row to ``manifest.csv`` (atomically) and start the journal afresh."""
        from wsiproto.files import write_text_atomic

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        write_text_atomic(self.path, buf.getvalue())
        self.close()
        self.journal_path.unlink(missing_ok=True)
        self.journal_rows = 0
        self.rewrites += 1
        self.rows_rewritten += len(self.rows)
        self._last_compact = time.monotonic()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


class CohortLock:
    """One cohort run per ``OUT`` at a time: an OS lock on ``OUT/.cohort.lock`` (``flock``
    through :mod:`filelock`), released by the kernel when the process ends however it ends.
    A second run is refused at once, in one line."""

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = folder
        self._lock = FileLock(folder / LOCK, timeout=0)

    def __enter__(self) -> CohortLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise WsiprotoError("another wsiproto cohort run is writing to this folder",
                                path=self.folder,
                                hint="wait for it to finish, or choose another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


__all__ = ["FIELDS", "STATUSES", "CohortLock", "Manifest"]
