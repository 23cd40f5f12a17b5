"""The output folder of a slide: names that cannot escape --out, the per-folder lock."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from wsiproto.errors import WsiprotoError
from wsiproto.segment.folder import FolderLock, output_name, slide_stem


@pytest.mark.parametrize("name,stem", [
    ("a.svs", "a"), ("TCGA-CR-7395-01A-01-TS1.svs", "TCGA-CR-7395-01A-01-TS1"),
    ("b.v2.ndpi", "b.v2"), ("c.ome.tiff", "c"), ("d.OME.TIF", "d"), ("noext", "noext"),
])
def test_slide_stem(name, stem):
    assert slide_stem(f"/data/{name}") == stem
    assert output_name(f"/data/{name}").name == stem
    assert not output_name(f"/data/{name}").changed


def test_slide_stem_of_a_url_ignores_the_query():
    assert slide_stem("https://host/a/b/slide.svs?X-Amz-Signature=abc#frag") == "slide"
    assert slide_stem("s3://bucket/x/y.ome.tif") == "y"


HOSTILE = ["...svs", "..svs", ".svs", "..", ".", "...", ".hidden.svs", "-rf.svs", "a\nb.svs",
           "a\x00b.svs", "con:aux.svs", " .svs", "name. .svs", "x" * 300 + ".svs",
           "\u202etxt.svs", "tab\there.svs", "é" * 120 + ".svs"]


@pytest.mark.parametrize("name", HOSTILE)
def test_every_name_maps_to_one_plain_folder_inside_out(name):
    mapped = output_name(f"/data/{name}")
    n = mapped.name
    assert n and n not in (".", "..") and "/" not in n and "\\" not in n and "\x00" not in n
    assert not n.startswith((".", "-", " ")) and not n.endswith((".", " "))
    assert all(c.isprintable() for c in n)
    assert len(n.encode()) <= 160
    assert mapped.changed == (n != slide_stem(f"/data/{name}"))
    assert mapped.describe()["from"] == slide_stem(f"/data/{name}")


def test_different_hostile_names_never_share_a_folder():
    names = {output_name(f"/d/{n}").name for n in HOSTILE if n not in (".", "..")}
    assert len(names) == len([n for n in HOSTILE if n not in (".", "..")])


def test_reserved_names_are_mapped_away():
    assert output_name("/d/manifest-tracebacks.svs", reserved=("manifest-tracebacks",)).changed
    assert not output_name("/d/other.svs", reserved=("manifest-tracebacks",)).changed


def _hold(folder: str, ready, release) -> None:
    from pathlib import Path

    with FolderLock(Path(folder)):
        ready.set()
        release.wait(30)


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(WsiprotoError, match=f"another wsiproto run \\(pid {proc.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        os.kill(proc.pid, 9)  # killed, not released: the kernel drops the lock
        proc.join()
    deadline = time.monotonic() + 10
    while True:
        try:
            with FolderLock(tmp_path):
                break
        except WsiprotoError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
