"""How the pipeline's threads share the CPU and the heap.

On a CPU the model's intra-op threads use every core. A thread reading, blending or tracing
beside them at the same priority preempts one of them, and the whole parallel region then
waits for the slowest thread: measured here (2 cores, dualproto-tiny) a busy numpy thread at
nice 0 cut the model from 68 to 28 tiles/s, at nice 15-19 to 66. So every thread the pipeline
starts for itself (read-ahead, chunk tasks, finishers, GeoJSON, pyramid) lowers its own priority
with :func:`lower_thread_priority`: it then runs in the gaps the model leaves (and at full speed
when the model waits for it, so no work is lost). Only threads the pipeline created and ends are
lowered; the caller's threads and the process keep their priority.

:func:`responsive_gil` shortens the interpreter's switch interval while a run is going: a helper
running Python code holds the GIL for up to the interval before the model's thread can take it
back to launch its next operation (measured: a pure-Python helper at nice 19 cost the model 20%
at the default 5 ms, 10% at 1 ms).

:func:`limit_malloc_arenas` makes glibc's malloc share one heap between threads. The pipeline
hands large buffers from thread to thread (a region read by the read-ahead thread is freed by
a chunk task, scores made by the model's thread are freed there too, labels go on to a
finisher); with one arena per thread, memory freed in another thread's arena is not reused
where it is needed next, and the heap creeps up with the length of the run. Measured with
``benchmarks/segment_memory.py`` (2 cores): peak RSS 2.03 GB on the 10k^2 slide and 2.54 GB
on the 40k^2 one (growth 1.25) with glibc's default arenas; with one arena 1.77-1.88 and
2.11-2.19 GB (growth 1.12-1.24), at the same speed. (The rest of the growth came from batch
shapes: see ``BatchRunner._predict``.)
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

HELPER_NICE = 19  # the lowest priority: helpers take only what the model leaves
M_ARENA_MAX = -8  # glibc's mallopt parameter number

_arenas_limited = False

_gil_lock = threading.Lock()
_gil_users = 0
_gil_saved: float | None = None


def lower_thread_priority(nice: int = HELPER_NICE) -> bool:
    """Give the calling thread the niceness ``nice`` (never raises it: a thread already nicer
    stays so). Linux only (threads have their own nice value there); elsewhere nothing happens.
    Returns whether the priority was changed. Use as a thread pool ``initializer``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) >= nice:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except (AttributeError, OSError):  # a sandbox refusing setpriority: run as is
        return False


@contextmanager
def responsive_gil(interval: float = 0.001):
    """Within the block, the interpreter switches threads every ``interval`` seconds (at most
    the current setting); restored when the last of several concurrent users leaves."""
    global _gil_users, _gil_saved
    with _gil_lock:
        if _gil_users == 0:
            _gil_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _gil_saved))
        _gil_users += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0 and _gil_saved is not None:
                sys.setswitchinterval(_gil_saved)
                _gil_saved = None


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let all threads share ``arenas`` glibc malloc arenas (see the module doc); once per
    process. Left alone when ``MALLOC_ARENA_MAX`` is set (the user's choice) or the C library is
    not glibc. Takes effect for arenas created afterwards (glibc decides the limit when a
    thread first needs a new arena). Returns whether the limit is now in force."""
    global _arenas_limited
    if _arenas_limited:
        return True
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        ok = libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(int(arenas))) == 1
    except (OSError, AttributeError):
        return False
    _arenas_limited = ok
    return ok


class HeapTrimmer:
    """A thread giving the free pages inside glibc's heap back to the system every
    ``interval_s`` (``malloc_trim``), at the lowest priority. With one arena, the small objects
    a long run keeps (GeoJSON ring pieces, zarr metadata) end up between the pages of freed
    chunk buffers, which the heap cannot shrink past: peak RSS crept up with the run's length.
    Measured with ``benchmarks/segment_memory.py`` (40k^2 slide): 2.43 GB without, 2.39 GB with
    a trim every 5 s (growth over the 10k^2 slide 1.19), 2.28 GB every second (1.15), which
    cost the model 2-3% (``segment_efficiency.py`` 0.699 against 0.725; at 5 s 0.717 against
    0.720): a trim holds malloc's lock for ~20 ms. A no-op where the C library is not glibc."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trim = None
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            pass

    def start(self) -> HeapTrimmer:
        if self._trim is not None and sys.platform.startswith("linux"):
            self._thread = threading.Thread(target=self._loop, name="wsiproto-trim", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        lower_thread_priority()
        while not self._stop.wait(self.interval_s):
            self._trim(ctypes.c_size_t(0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Runtime:
    def freeze(self) -> None:
        """Keep the cyclic garbage collector off every object alive now (call once the
        long-lived ones, e.g. the model, exist)."""
        import gc

        gc.freeze()


@contextmanager
def runtime():
    """The process-wide settings a segmentation process runs best with, entered by the
    ``wsiproto`` command and by cohort workers around their work (never by a library call):

    * glibc malloc limited to one arena (:func:`limit_malloc_arenas`; stays for the process:
      enter before the model is loaded, so that its threads share the arena too);
    * the cyclic garbage collector kept off the objects alive at ``.freeze()`` (the model,
      torch, the libraries: a full collection over a loaded model costs ~0.2 s, on the model's
      time); undone at exit;
    * a short GIL switch interval (:func:`responsive_gil`); restored at exit;
    * the heap trimmed every 5 seconds (:class:`HeapTrimmer`); stopped at exit;
    * tifffile's and tiffslide's loggers at ERROR (a damaged file's oddities reach the user
      once, as our own error); restored at exit.
    """
    import gc
    import logging

    limit_malloc_arenas()
    loggers = [logging.getLogger(n) for n in ("tifffile", "tiffslide")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    rt = _Runtime()
    rt.freeze()
    trimmer = HeapTrimmer().start()
    try:
        with responsive_gil():
            yield rt
    finally:
        trimmer.stop()
        gc.unfreeze()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
