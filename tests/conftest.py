"""Shared fixtures: where the real data lives, and synthetic slides written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """``$WSIPROTO_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("WSIPROTO_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = shared_data().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set WSIPROTO_SHARED_DATA)")
    return path


SYNTH_W, SYNTH_H, SYNTH_MPP = 4096, 3072, 0.5


@pytest.fixture(scope="session")
def synthetic_svs(tmp_path_factory):
    """An Aperio-style 3-level JPEG pyramid (4096x3072, mpp 0.5) and its render function."""
    from wsiproto.slide.synthetic import blob_layout, write_pyramidal_tiff

    render = blob_layout(SYNTH_W, SYNTH_H, seed=1)
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.svs"
    write_pyramidal_tiff(path, SYNTH_W, SYNTH_H, render, mpp=SYNTH_MPP, levels=3)
    return path, render


def pytest_sessionfinish(session, exitstatus):
    """A run in which no test passed (everything skipped or deselected) is a failed run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and exitstatus == 0 and not reporter.stats.get("passed"):
        reporter.write_line("wsiproto: no test passed (all skipped?); failing the run", red=True)
        session.exitstatus = 1
