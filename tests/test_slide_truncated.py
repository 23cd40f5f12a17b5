"""A damaged slide is an error, never an empty slide (issue 16, defect 2).

The real CMU slide cut through its headers and its tile data, for every registered backend that
reads SVS (the remote one over HTTP), through ``Slide`` and through the command line (exit 2,
exactly one line on stderr, nothing written); the synthetic writer's output cut likewise; and the
quieter cases of the same kind: a missing tile read as black, an associated image or a
thumbnail that does not decode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from wsiproto.errors import WsiprotoError
from wsiproto.slide import Slide, detect_tissue, registered

from conftest import shared_file
from slideservers import TOKEN, range_server

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CMU_SIZE = 1_938_955
# In the first tile, in the tile data, inside level 0's directory (its tile tables: the
# reported case), in the middle of the associated images' data, in the last directory.
OFFSETS = (1000, 20_000, 1_276_200, CMU_SIZE // 2, CMU_SIZE - 100)
SVS_READERS = [b.name for b in registered() if ".svs" in b.suffixes]


def wsiproto(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiproto", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def cut_cmu(tmp_path_factory):
    src = shared_file("slides", "CMU-1-Small-Region.svs").read_bytes()
    assert len(src) == CMU_SIZE
    folder = tmp_path_factory.mktemp("truncated")
    out = {}
    for offset in OFFSETS:
        out[offset] = folder / f"CMU-cut-{offset}.svs"
        out[offset].write_bytes(src[:offset])
    return out


def assert_truncated_error(text: str, shown: str) -> None:
    assert "\n" not in text.strip()
    assert text.startswith(shown) and "truncated or corrupt" in text and "re-copy it" in text


@pytest.mark.parametrize("backend", SVS_READERS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_slide_refuses_a_truncated_file(cut_cmu, offset, backend):
    path = cut_cmu[offset]
    if "url" in next(b for b in registered() if b.name == backend).kinds:
        with range_server({"/s.svs": path.read_bytes()}) as server:
            url = server.url("/s.svs")
            with pytest.raises(WsiprotoError) as err:
                Slide(url, backend=backend)
        shown = url.split("?")[0] + "?<redacted>"
        assert TOKEN not in str(err.value)
    else:
        with pytest.raises(WsiprotoError) as err:
            Slide(path, backend=backend)
        shown = str(path)
    assert_truncated_error(str(err.value), shown)


@pytest.mark.parametrize("offset,backend", [(o, "auto") for o in OFFSETS]
                         + [(1_276_200, "tiffslide"), (1_276_200, "openslide")])
def test_info_on_a_truncated_file_is_one_line(cut_cmu, offset, backend):
    proc = wsiproto("info", str(cut_cmu[offset]), "--backend", backend)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # no tifffile lines, no warnings
    assert_truncated_error(proc.stderr.removeprefix("wsiproto: error: "), str(cut_cmu[offset]))


@pytest.mark.parametrize("offset,backend", [(1_276_200, "tiffslide"), (CMU_SIZE // 2, "auto")])
def test_segment_on_a_truncated_file_writes_nothing(cut_cmu, tmp_path, offset, backend):
    out = tmp_path / "out"
    proc = wsiproto("segment", str(cut_cmu[offset]), "--mpp", "0.5", "--out", str(out),
                    "--backend", backend, "--quiet")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert_truncated_error(proc.stderr.removeprefix("wsiproto: error: "), str(cut_cmu[offset]))
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("fraction", (0.0005, 0.01, 0.33, 0.9, 0.9999))
def test_synthetic_slide_truncated(synthetic_svs, tmp_path, fraction):
    data = synthetic_svs[0].read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(WsiprotoError, match="truncated or corrupt"):
            Slide(cut, backend=backend)


def _patch_tile_table(path, page_index: int, tag: str, tile: int, value: int) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        t = tf.pages[page_index].tags[tag]
        offset, width = t.valueoffset, {3: 2, 4: 4, 16: 8}[int(t.dtype)]
    with open(path, "r+b") as fh:
        fh.seek(offset + tile * width)
        fh.write(int(value).to_bytes(width, "little"))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_tile_with_no_bytes_is_the_fill_value_not_black(synthetic_svs, tmp_path, backend):
    """A sparse tile (listed with 0 bytes): OpenSlide returns it transparent; tiffslide returned
    black. Both now give the fill value, as for any pixel with nothing scanned."""
    sparse = tmp_path / "sparse.svs"
    shutil.copy(synthetic_svs[0], sparse)
    _patch_tile_table(sparse, 0, "TileByteCounts", 5, 0)  # tile (row 0, column 5)
    with Slide(sparse, backend=backend, fill=(10, 20, 30)) as s:
        got = s.read_region((5 * 256 - 8, 0), (272, 260))
    assert (got[:256, 8:264] == (10, 20, 30)).all()
    assert (got[:256, :8] != (10, 20, 30)).any(axis=-1).all()
    assert (got[258:, 8:264] != (10, 20, 30)).any(axis=-1).all()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_an_associated_image_that_does_not_decode_is_one_line(tmp_path, backend):
    src = shared_file("slides", "CMU-1-Small-Region.svs")
    bad = tmp_path / "bad-label.svs"
    shutil.copy(src, bad)
    import tifffile

    with tifffile.TiffFile(bad) as tf:  # page 2: the label, LZW strips
        page = tf.pages[2]
        start, count = page.dataoffsets[0], sum(page.databytecounts)
    with open(bad, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff" * count)
    with Slide(bad, backend=backend) as s:
        try:
            label = s.associated_image("label")
        except WsiprotoError as err:
            assert str(bad) in str(err) and "label" in str(err) and "\n" not in str(err)
        else:  # a decoder that returns something must return the image's own size
            assert label.shape == (463, 387, 3)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_corrupt_level_is_no_tissue_never(synthetic_svs, tmp_path, backend):
    """Tissue detection reads a thumbnail from the coarsest level: garbage there is an error,
    not an empty mask."""
    import tifffile

    bad = tmp_path / "bad-level.svs"
    shutil.copy(synthetic_svs[0], bad)
    with tifffile.TiffFile(bad) as tf:
        level2 = next(p for p in tf.pages if p.is_tiled and p.shape[:2] == (768, 1024))
        spans = list(zip(level2.dataoffsets, level2.databytecounts))
    with open(bad, "r+b") as fh:
        for offset, count in spans:
            fh.seek(offset + 20)
            fh.write(b"\x00\xff" * ((count - 40) // 2))
    with Slide(bad, backend=backend) as s:
        with pytest.raises(WsiprotoError, match="level=2"):
            detect_tissue(s)


def test_decoder_logs_fail_the_reads_in_flight_and_stay_off_the_terminal(capfd):
    """What tifffile logs during our calls is collected, from the calling thread or another
    (zarr decodes on its own thread), and not printed; outside our calls it passes untouched."""
    import logging
    import threading

    from wsiproto.slide.integrity import library_log

    tifffile_log = logging.getLogger("tifffile")
    with library_log() as mine:
        tifffile_log.error("decode failed in this thread")
        other = threading.Thread(target=tifffile_log.error, args=("decode failed elsewhere",))
        other.start()
        other.join()
        tifffile_log.warning("a harmless note")
    assert mine == ["decode failed in this thread", "decode failed elsewhere"]
    assert "decode failed" not in capfd.readouterr().err
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tifffile_log.addHandler(handler)
    try:
        tifffile_log.error("not ours")
    finally:
        tifffile_log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["not ours"]
