"""`wsiproto cohort --scheduler` against a real dask scheduler and two workers started as
separate processes (``dask scheduler``, ``dask worker``), as a shared deployment runs them: the
slides are done, a worker killed mid-slide costs only that slide's unfinished chunks, and a
scheduler that is not there is one line within seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cohort_helpers import MidSlideKiller, manifest_rows, popen_wsiproto, write_slides
from test_cli import assert_one_line_error, wsiproto


@pytest.fixture
def dask_deployment(tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1: (address, client)."""
    from distributed import Client

    logs = open(tmp_path / "dask.log", "w")
    file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(file)],
        stdout=logs, stderr=logs)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                 "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}"],
                stdout=logs, stderr=logs, env={**os.environ, "HF_HUB_OFFLINE": "1"}))
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            yield address, client
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def test_cohort_on_a_scheduler_survives_a_worker_killed_mid_slide(dask_deployment, tmp_path):
    address, client = dask_deployment
    paths = write_slides(tmp_path / "slides", ["s0.svs", "s1.svs", "s2.svs"], 1536, 1024)
    out = tmp_path / "out"
    with MidSlideKiller(client, out) as killer:
        proc = popen_wsiproto("cohort", str(tmp_path / "slides"), "--scheduler", address,
                              "--out", str(out), "--chunk-size", "512")
        stdout, stderr = proc.communicate(timeout=400)
    killed = killer.killed
    assert proc.returncode == 0, stderr
    assert f"scheduler {address}: 2 worker(s)" in stderr
    assert "dask dashboard: http://127.0.0.1:" in stderr
    assert killed, "no slide was caught mid-run"
    stem, dead = killed[0]
    assert f"its worker {dead} died" in stderr and "resuming on" in stderr
    rows = manifest_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {p.name: "done" for p in paths}
    row = rows[f"{stem}.svs"]
    assert row["worker"] != dead and row["attempts"] == "2"
    chunks = json.loads((out / stem / "summary.json").read_text())["chunks"]
    assert chunks["resumed"] > 0 and chunks["resumed"] + chunks["run_now"] == chunks["visited"]


def test_a_scheduler_that_is_not_there_is_one_line_within_seconds(tmp_path):
    from wsiproto.cohort.cluster import free_port

    (slide,) = write_slides(tmp_path, ["a.svs"], 512, 512)
    address = f"tcp://127.0.0.1:{free_port('127.0.0.1', 1)}"
    t0 = time.monotonic()
    proc = wsiproto("cohort", str(slide), "--scheduler", address, "--out", str(tmp_path / "o"))
    took = time.monotonic() - t0
    assert_one_line_error(proc, "cannot connect to the dask scheduler", address)
    assert took < 30, took  # python start + imports + the 5 s connect timeout
