"""The small version of ``benchmarks/cohort_overhead.py``: 40 tiny slides, 2 random worker
kills on a LocalCluster the cohort starts itself; every slide done exactly once, the manifest
consistent after each kill, the client's time per slide within the target."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cohort_overhead.py"


def test_forty_slides_two_kills(tmp_path):
    spec = importlib.util.spec_from_file_location("cohort_overhead", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fig = bench.run(40, 2, 2, 320, tmp_path, gap_s=(0.5, 1.5))
    result = fig["result"]
    assert fig["kills"] == 2 and fig["problems"] == []
    assert fig["once"] and fig["consistent"] and result.counts == {"done": 40}
    o = result.overhead_s
    client = sum(o.get(k, 0) for k in ("plan", "submit", "results", "tick", "end"))
    assert client / 40 < 0.05, o
