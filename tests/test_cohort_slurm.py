"""`wsiproto cohort --slurm` on a real single-node SLURM (munged, slurmctld, slurmd started by
``.ci/slurm-up.sh``): jobs submitted through dask-jobqueue segment the slides; a bad slide is a
manifest row; a job cancelled mid-slide is replaced and the next job resumes the slide; a job
that reaches its walltime mid-slide is reported in one line.

Where SLURM cannot start (not root, not installed) these tests skip with the reason; with
``WSIPROTO_CI=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cohort_helpers import manifest_rows, popen_wsiproto, truncated_copy, write_slides

REPO = Path(__file__).resolve().parents[1]
UP = REPO / ".ci" / "slurm-up.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node SLURM: the environment its clients need (SLURM_CONF)."""
    state = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run([str(UP), str(state)], capture_output=True, text=True,
                              timeout=90)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 3, "", "slurm-up.sh timed out")
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        if os.environ.get("WSIPROTO_CI"):
            pytest.fail(f"SLURM must start in CI: {why}")
        pytest.skip(f"no SLURM on this machine: {why}")
    env = {"SLURM_CONF": proc.stdout.strip().splitlines()[-1]}
    yield env
    subprocess.run([str(UP), "--down", str(state)], timeout=30)


def slurm_args(out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--chunk-size", "512", "--slurm", "--slurm-cores", "1",
            "--slurm-memory", "2GB", "--listen", "127.0.0.1", *extra]


def our_jobs(env: dict) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-o", "%i", "--name", "wsiproto-cohort"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=30)
    return proc.stdout.split()


def wait_mid_slide(out: Path, proc, timeout_s: float = 240) -> int:
    """Wait until a slide has finished chunks but no summary; return how many chunks."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        for done in out.glob("*/.partial/done"):
            n = len(list(done.iterdir()))
            if n and not (done.parent.parent / "summary.json").exists():
                return n
        time.sleep(0.05)
    raise AssertionError("no slide was caught mid-run: " + (proc.stderr.read() if
                                                            proc.poll() is not None else ""))


def job_processes(job: str) -> list[int]:
    """The pids of processes started by SLURM job ``job`` (their environment says so)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_JOB_ID={job}".encode() in env:
                pids.append(int(entry.name))
    return pids


def test_slurm_good_slides_and_a_corrupt_one(slurm, tmp_path):
    slides = tmp_path / "slides"
    good = write_slides(slides, [f"case{i}.svs" for i in range(3)], 768, 512)
    truncated_copy(good[0], slides / "corrupt.svs")
    out = tmp_path / "out"
    proc = popen_wsiproto("cohort", str(slides), *slurm_args(out, "--slurm-jobs", "2",
                                                             "--skip-errors"), env=slurm)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 1, stderr
    assert "SLURM: 2 job(s) of 1 cores" in stderr
    rows = manifest_rows(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "case0.svs": "done", "case1.svs": "done", "case2.svs": "done", "corrupt.svs": "failed"}
    assert "truncated or corrupt" in rows["corrupt.svs"]["error"]
    assert "3 done (3 run now, 0 already done), 1 failed" in stdout
    assert list((out / "slurm-logs").glob("wsiproto-cohort-*.err"))  # the jobs' own logs
    assert not our_jobs(slurm)  # the jobs ended with the run


def test_slurm_job_cancelled_mid_slide_is_resumed_by_the_next_job(slurm, tmp_path):
    (slide,) = write_slides(tmp_path / "slides", ["big.svs"], width=2048, height=1024)
    out = tmp_path / "out"
    proc = popen_wsiproto("cohort", str(slide), *slurm_args(out, "--slurm-jobs", "1",
                                                            "--slurm-walltime", "00:10:00"),
                          env=slurm)
    seen = wait_mid_slide(out, proc)
    (job,) = our_jobs(slurm)
    subprocess.run(["scancel", job], env={**os.environ, **slurm}, check=True, timeout=30)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr
    assert f"its SLURM job {job} ended (cancelled); resuming on" in stderr
    row = manifest_rows(out)["big.svs"]
    assert row["status"] == "done" and row["attempts"] == "2"
    chunks = json.loads((out / "big" / "summary.json").read_text())["chunks"]
    # The next job did not redo what the cancelled one had finished, nor anything twice.
    assert chunks["resumed"] >= seen and chunks["resumed"] + chunks["run_now"] == chunks["visited"]
    assert not our_jobs(slurm)


def test_slurm_walltime_too_short_for_a_slide_says_so(slurm, tmp_path):
    """The job's worker is paused mid-slide (SIGSTOP), so the 1-minute walltime ends the job
    with the slide unfinished, whatever the machine's speed."""
    (slide,) = write_slides(tmp_path / "slides", ["long.svs"], width=1536, height=1024)
    out = tmp_path / "out"
    proc = popen_wsiproto("cohort", str(slide), *slurm_args(out, "--slurm-jobs", "1",
                                                            "--slurm-walltime", "00:01:00",
                                                            "--retries", "0", "--skip-errors"),
                          env=slurm)
    wait_mid_slide(out, proc)
    (job,) = our_jobs(slurm)
    for pid in job_processes(job):
        os.kill(pid, signal.SIGSTOP)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 1, stderr
    row = manifest_rows(out)["long.svs"]
    assert row["status"] == "failed"
    assert row["error"] == (f"{slide}: its SLURM job {job} reached the walltime (00:01:00) "
                            "before the slide was finished; raise --slurm-walltime (finished "
                            "chunks are kept: a rerun resumes)")
    assert (out / "long" / ".partial" / "done").is_dir()  # kept for the rerun
    assert not our_jobs(slurm)
