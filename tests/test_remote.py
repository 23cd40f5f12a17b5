"""Slides by URL against real servers on 127.0.0.1: HTTP with Range requests, and moto's S3 API.

What holds: region reads and ``wsiproto info`` equal the local file's; each byte crosses the
network once (the shared block cache); no credential (the token in the query string, the S3
keys) is ever shown; a server that dies, refuses, or ignores Range requests is one line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from wsiproto.cli import main
from wsiproto.errors import WsiprotoError
from wsiproto.slide import Slide, urls

from conftest import shared_file
from slideservers import S3_ENV, TOKEN, range_server, s3_server

REGIONS = [((0, 0), (256, 256)), ((1500, 2500), (300, 300)), ((2100, 10), (200, 100))]


@pytest.fixture(scope="module")
def cmu():
    return shared_file("slides", "CMU-1-Small-Region.svs")


@pytest.fixture
def small_blocks(monkeypatch):
    """64 KiB blocks, so that a slide spans many (the CMU slide fits in one 2 MiB block)."""
    monkeypatch.setattr(urls, "BLOCK_SIZE", 64 << 10)


def info_json(capsys, *args) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def same_info(a: dict, b: dict) -> bool:
    drop = ("path", "backend")
    return {k: v for k, v in a.items() if k not in drop} == \
        {k: v for k, v in b.items() if k not in drop}


def test_http_reads_and_info_equal_the_local_file(cmu, capsys):
    with range_server({"/a/CMU-1-Small-Region.svs": cmu.read_bytes()}) as server:
        url = server.url("/a/CMU-1-Small-Region.svs")
        with Slide(url) as remote, Slide(cmu, backend="tiffslide") as local:
            assert remote.backend == "remote"
            assert remote.source == url.split("?")[0] + "?<redacted>"
            for loc, size in REGIONS:
                np.testing.assert_array_equal(remote.read_region(loc, size),
                                              local.read_region(loc, size))
            np.testing.assert_array_equal(remote.read_region((11, 13), (200, 150), mpp=1.3),
                                          local.read_region((11, 13), (200, 150), mpp=1.3))
            np.testing.assert_array_equal(remote.associated_image("label"),
                                          local.associated_image("label"))
        remote_info = info_json(capsys, url)
        local_info = info_json(capsys, str(cmu), "--backend", "tiffslide")
    assert same_info(remote_info, local_info)
    assert remote_info["path"].endswith("?<redacted>") and TOKEN not in json.dumps(remote_info)


def test_each_byte_crosses_once(synthetic_svs, small_blocks):
    """Two reading threads (one clone each) read all of level 0 and a thumbnail; the server
    sends the file at most once (the last block rounded up)."""
    path, _ = synthetic_svs
    data = path.read_bytes()
    with range_server({"/s.svs": data}) as server:
        with Slide(server.url("/s.svs")) as slide:
            w, h = slide.size
            boxes = [(x, y) for y in range(0, h, 1024) for x in range(0, w, 1024)]

            def work(part):
                with slide.clone() as mine:
                    for x, y in part:
                        mine.read_region((x, y), (1024, 1024))

            threads = [threading.Thread(target=work, args=(boxes[i::2],)) for i in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            slide.thumbnail(512)
            first = server.sent
            slide.read_region((0, 0), (2048, 2048))  # again: nothing crosses
        assert len(data) / 2 < first <= len(data) + (64 << 10)  # level 0 is most of the file
        assert server.sent == first


def test_s3_reads_and_info_equal_the_local_file(cmu, capsys, monkeypatch):
    import fsspec.config

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    with s3_server({"cases/CMU-1-Small-Region.svs": cmu.read_bytes()}) as endpoint:
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        url = "s3://slides/cases/CMU-1-Small-Region.svs"
        with Slide(url) as remote, Slide(cmu, backend="tiffslide") as local:
            assert remote.source == url and remote.identity()["etag"]
            for loc, size in REGIONS:
                np.testing.assert_array_equal(remote.read_region(loc, size),
                                              local.read_region(loc, size))
        local_info = info_json(capsys, str(cmu), "--backend", "tiffslide")
        # The command line, credentials and endpoint from the environment only.
        env = {**os.environ, **S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
        proc = subprocess.run([sys.executable, "-m", "wsiproto", "info", url, "--json"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert same_info(json.loads(proc.stdout), local_info)
        assert "testing" not in proc.stdout
        with pytest.raises(WsiprotoError, match="no such file on the server"):
            Slide("s3://slides/cases/missing.svs")


def test_a_server_that_dies_mid_read_is_one_line(cmu, small_blocks):
    server = range_server({"/d/CMU.svs": cmu.read_bytes()})
    with server as srv:
        url = srv.url("/d/CMU.svs")
        slide = Slide(url)
        slide.read_region((0, 0), (256, 256))
    # The server is gone; the bottom of the slide was never fetched.
    with pytest.raises(WsiprotoError) as err:
        slide.read_region((1500, 2500), (300, 300))
    text = str(err.value)
    assert "\n" not in text and TOKEN not in text
    assert text.startswith(url.split("?")[0] + "?<redacted>: cannot read region")
    assert "run again" in text
    slide.close()


@pytest.mark.parametrize("case,needle", [
    ("bad-token", "access denied"),
    ("missing", "no such file on the server"),
    ("no-ranges", "does not honour HTTP Range requests"),
    ("not-tiff", "must be TIFF-based"),
    ("truncated", "truncated or corrupt"),
])
def test_remote_failures_are_one_line_without_the_token(cmu, small_blocks, case, needle):
    data = cmu.read_bytes()
    files = {"/x.svs": data, "/notes.svs": b"not a slide\n" * 100,
             "/cut.svs": data[:1_276_200]}
    with range_server(files, ranges=case != "no-ranges") as srv:
        url = {"bad-token": srv.url("/x.svs", token="wrong"), "missing": srv.url("/y.svs"),
               "no-ranges": srv.url("/x.svs"), "not-tiff": srv.url("/notes.svs"),
               "truncated": srv.url("/cut.svs")}[case]
        with pytest.raises(WsiprotoError, match=needle) as err:
            Slide(url)
    text = str(err.value)
    assert "\n" not in text and TOKEN not in text and "wrong" not in text
    assert text.startswith(url.split("?")[0] + "?<redacted>: ")


def test_identity_follows_the_content_not_the_token(cmu):
    data = cmu.read_bytes()
    with range_server({"/i.svs": data}) as srv:
        with Slide(srv.url("/i.svs")) as s:
            first = s.identity()
        srv.files["/i.svs"] = data[:-1] + b"\x01"  # same size, other bytes: another ETag
        with Slide(srv.url("/i.svs")) as s:
            assert s.identity() != first and s.identity()["bytes"] == first["bytes"]
    assert all(TOKEN not in str(v) for v in first.values())


def test_redaction():
    assert urls.redact("https://u:p@host/a/b.svs?X-Amz-Signature=abc#f") == \
        "https://<redacted>@host/a/b.svs?<redacted>"
    assert urls.redact("s3://bucket/key.svs") == "s3://bucket/key.svs"
    url = "https://host/a.svs?sig=abc"
    assert urls.scrub(f"GET {url} failed; also https://other/x?tok=1 and ftp://u:pw@h/f", url) \
        == ("GET https://host/a.svs?<redacted> failed; also https://other/x?<redacted> and "
            "ftp://<redacted>@h/f")
