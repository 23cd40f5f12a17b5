"""A damaged slide is an error, never an empty one.

Readers are lenient with damaged TIFF files: tifffile logs an ERROR and carries on, tiffslide
then returns zeros for the tiles it could not find (a slide cut inside its level-0 directory
read as black, "no tissue", exit 0: issue 16, defect 2). Two guards:

- :func:`check_tiff` at open, whatever the backend: every directory (IFD) of the file, sub-IFDs
  included, readable without a logged error, every tiled level listing all its tiles, and
  every tile's or strip's bytes inside the file.
- :func:`library_log` around every open and read: what tifffile logs at ERROR in this thread
  is collected (and kept off the user's terminal: it is reported once, as a WsiprotoError, or
  at ``--debug`` level), so that a read whose decoder complained is a failed read. pydicom's
  notes (deprecations inside wsidicom) are kept off the terminal the same way.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.slide.backends.base import PLAUSIBLE_MPP

log = logging.getLogger(__name__)

#: Loggers of the decoding libraries whose complaints are ours to report (their errors fail
#: the read), and of those that are only kept off the terminal during our calls.
LIBRARY_LOGGERS = ("tifffile", "tiffslide")
QUIETED_LOGGERS = ("pydicom",)
# tifffile reports a directory offset outside the file as a warning and stops reading.
_STRUCTURAL = re.compile(r"invalid (page |value )?offset|corrupted|truncated", re.IGNORECASE)


class _Collector(logging.Filter):
    """While ``library_log()`` blocks run, keeps the libraries' records (and the serious ones'
    text) off the terminal; outside them, lets records through untouched. A record from a
    thread without a block of its own (zarr decodes on its own I/O thread) goes to every block
    running: a decoder's complaint then fails the reads in flight, never none of them."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()
        self.active: dict[int, list[str]] = {}  # by id: empty lists compare equal
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(self.local, "sink", None)
        with self.lock:
            sinks = [own] if own is not None else list(self.active.values())
        if not sinks:
            return True
        message = record.getMessage()
        log.debug("%s: %s", record.name, message)
        if record.name in LIBRARY_LOGGERS and (
                record.levelno >= logging.ERROR or _STRUCTURAL.search(message)):
            for sink in sinks:
                sink.append(message)
        return False


_COLLECTOR = _Collector()
for _name in LIBRARY_LOGGERS + QUIETED_LOGGERS:
    logging.getLogger(_name).addFilter(_COLLECTOR)


@contextmanager
def library_log() -> Iterator[list[str]]:
    """Collect what the decoding libraries report as errors in this thread, in a list."""
    previous = getattr(_COLLECTOR.local, "sink", None)
    sink: list[str] = []
    _COLLECTOR.local.sink = sink
    with _COLLECTOR.lock:
        _COLLECTOR.active[id(sink)] = sink
    try:
        yield sink
    finally:
        _COLLECTOR.local.sink = previous
        with _COLLECTOR.lock:
            del _COLLECTOR.active[id(sink)]


def corrupt(shown: str, detail: str) -> WsiprotoError:
    """The one line for a slide file that is not whole."""
    return WsiprotoError(f"truncated or corrupt ({_short(detail)})", path=shown,
                         hint="re-copy it from its source (check its size and checksum)")


def check_tiff(source: Any, size: int, shown: str) -> tuple[float, float] | None:
    """Check a TIFF file's structure (``source``: a path or a binary file of ``size`` bytes);
    returns the pixel size of its first page's resolution tags when plausible, else None.
    Raises the one-line "truncated or corrupt" error naming ``shown``."""
    import tifffile

    with library_log() as errors:
        try:
            with tifffile.TiffFile(source) as tf:
                pages = _all_pages(tf.pages)
                problem = next(filter(None, (_page_problem(p, size) for p in pages)), None)
                mpp = resolution_mpp(pages[0]) if pages else None
        except WsiprotoError:
            raise
        except Exception as exc:
            raise corrupt(shown, f"{type(exc).__name__}: {exc}") from None
    if not pages:
        problem = "no readable image directory"
    if errors and not problem:
        problem = errors[0]
    if problem:
        raise corrupt(shown, problem)
    return mpp


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_pages(pages) -> list:
    """Every page of a TiffPages sequence, with the pages of their SubIFDs (OME pyramids)."""
    out = []
    for page in pages:
        out.append(page)
        if getattr(page, "subifds", None):
            sub = page.pages
            if sub is not None:
                out.extend(_all_pages(sub))
    return out


def _page_problem(page, size: int) -> str | None:
    """What is wrong with one page's tile (or strip) table, or None."""
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    where = f"directory {page.index} at byte {page.offset}"
    if not page.shape or not np.prod(page.shape):
        return None
    expected = int(np.prod(page.chunked)) if page.is_tiled else None
    if offsets.size == 0 or offsets.size != counts.size or \
            (expected is not None and offsets.size != expected):
        return f"{where}: {offsets.size} of {expected or 'its'} tiles listed"
    beyond = (counts > 0) & (offsets + counts > size)
    if beyond.any():
        return f"{where}: {int(beyond.sum())} of {offsets.size} tiles end past the end of the file"
    return None


def resolution_mpp(page) -> tuple[float, float] | None:
    """Pixel size from a page's XResolution / YResolution / ResolutionUnit tags, when those
    describe a scan (a 72-dpi default of a generic writer, 352 um/px, does not)."""
    tags = page.tags
    unit, xres, yres = (tags.get(k) for k in ("ResolutionUnit", "XResolution", "YResolution"))
    if unit is None or xres is None or yres is None:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
    try:
        xr, yr = (float(v.value[0]) / float(v.value[1]) for v in (xres, yres))
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if um_per_unit is None or xr <= 0 or yr <= 0:
        return None
    mpp = (um_per_unit / xr, um_per_unit / yr)
    lo, hi = PLAUSIBLE_MPP
    return mpp if all(lo <= m <= hi for m in mpp) else None
