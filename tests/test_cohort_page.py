"""``OUT/report.html``: static, one file, nothing fetched at view time; checked in a real
headless Chromium (loads from file:// without console errors, one row per manifest row,
sortable by class share, a screenshot that is not blank)."""

from __future__ import annotations

import io
import os
import re

import pytest
from browser import Browser, chromium, file_url
from cohort_helpers import manifest_rows, write_slides


@pytest.fixture(scope="module")
def cohort_out(tmp_path_factory):
    """A small cohort run in this process: 3 slides done, a file that is no slide failed."""
    from distributed import Client, LocalCluster

    from wsiproto.cohort import run_cohort
    from wsiproto.segment import SegmentOptions

    root = tmp_path_factory.mktemp("page")
    write_slides(root / "slides", ["a.svs", "b.svs", "c.svs"], 768, 512)
    (root / "slides" / "broken.svs").write_text("not a slide at all\n")
    out = root / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        result = run_cohort([root / "slides"], SegmentOptions(out=out, chunk=512),
                            device="cpu", client=client, skip_errors=True, progress=False,
                            echo=lambda m: None)
    assert result.counts == {"done": 3, "failed": 1}
    return out


def test_page_is_one_static_file(cohort_out):
    page = (cohort_out / "report.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to fetch
    assert page.count("<tr data-name=") == len(manifest_rows(cohort_out))
    assert page.count('src="data:image/jpeg;base64,') == 3  # an overlay per done slide
    assert "broken.svs: " in page and 'href="manifest-tracebacks/' in page
    assert page.count('<th data-key="c') == 5  # TUM STR LYM NEC background
    assert not [p for p in os.listdir(cohort_out) if p.endswith(".part")]


def test_page_rewrites_are_throttled(tmp_path):
    from wsiproto.cohort.page import Entry, ReportPage

    page = ReportPage(tmp_path, min_interval_s=60)
    page.set(Entry("/s/a.svs", "a", "queued"))
    assert page.write(force=True) and not page.write()  # too soon
    page.set(Entry("/s/a.svs", "a", "done", 2.0, 1.5, {"TUM": 60, "STR": 40},
                   {"TUM": [255, 0, 0], "STR": [0, 255, 0]}))
    assert page.write(force=True) and page.writes == 2
    text = page.path.read_text()
    assert '<th data-key="c0">TUM %</th>' in text and "1 done" in text


def test_page_in_a_headless_browser(cohort_out, tmp_path):
    exe, why = chromium()
    if exe is None:
        if os.environ.get("WSIPROTO_CI"):
            pytest.fail(f"the browser test must run in CI: {why}")
        pytest.skip(why)
    from PIL import Image

    rows = manifest_rows(cohort_out)
    with Browser(exe) as browser:
        browser.open(file_url(cohort_out / "report.html"))
        assert browser.problems() == []
        assert browser.evaluate("document.querySelectorAll('#slides tbody tr').length") \
            == len(rows)
        assert browser.evaluate("document.querySelectorAll('#slides img').length") == 3
        assert browser.evaluate("document.querySelector('#chart').getBBox().width") > 0
        # Sorting by a class share: a click sorts descending, another ascending.
        order = "Array.from(document.querySelectorAll('#slides tbody tr'))" \
                ".map(function (r) { return parseFloat(r.dataset.c0); })"
        browser.evaluate("document.querySelector('th[data-key=c0]').click()")
        shares = browser.evaluate(order)
        assert shares == sorted(shares, reverse=True)
        browser.evaluate("document.querySelector('th[data-key=c0]').click()")
        assert browser.evaluate(order) == sorted(shares)
        assert browser.problems() == []
        png = browser.screenshot()
    (tmp_path / "report.png").write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert img.size[0] >= 800 and len(colours) > 50  # text, bars, thumbnails: not blank
    assert max(n for n, _ in colours) < 0.9 * img.size[0] * img.size[1]
