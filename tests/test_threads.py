"""Helper threads run below the model; the caller's thread and the interpreter are left as
they were."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from wsiproto.segment.threads import HELPER_NICE, lower_thread_priority, responsive_gil


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_lower_thread_priority_changes_only_the_calling_thread():
    mine = _nice()
    seen = {}

    def helper():
        seen["changed"] = lower_thread_priority()
        seen["nice"] = _nice()
        seen["again"] = lower_thread_priority()  # already there: nothing to do

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen["nice"] == max(HELPER_NICE, mine)
    assert seen["changed"] is (mine < HELPER_NICE)
    assert seen["again"] is False
    assert _nice() == mine  # the caller keeps its priority


def test_responsive_gil_nests_and_restores_the_switch_interval():
    before = sys.getswitchinterval()
    with responsive_gil(0.001):
        assert sys.getswitchinterval() == pytest.approx(min(0.001, before))
        with responsive_gil(0.0005):  # a second run in another thread: the first setting stays
            assert sys.getswitchinterval() == pytest.approx(min(0.001, before))
        assert sys.getswitchinterval() == pytest.approx(min(0.001, before))
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), responsive_gil():
        raise RuntimeError("boom")
    assert sys.getswitchinterval() == before


def test_limit_malloc_arenas_respects_the_users_setting(monkeypatch):
    import wsiproto.segment.threads as threads

    monkeypatch.setattr(threads, "_arenas_limited", False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert threads.limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert threads.limit_malloc_arenas() is glibc
    assert threads.limit_malloc_arenas() is glibc  # once per process: the second call is a no-op


def test_runtime_trims_the_heap_only_while_it_is_entered():
    """runtime() runs its heap trimmer thread at the lowest priority while entered, and leaves
    no thread behind; the process's switch interval and GC state come back."""
    import gc

    from wsiproto.segment.threads import HeapTrimmer, runtime

    interval = sys.getswitchinterval()
    with runtime():
        trimmers = [t for t in threading.enumerate() if t.name == "wsiproto-trim"]
        assert len(trimmers) == (1 if HeapTrimmer()._trim is not None else 0)
    assert not any(t.is_alive() for t in trimmers)
    assert sys.getswitchinterval() == interval and gc.get_freeze_count() == 0
