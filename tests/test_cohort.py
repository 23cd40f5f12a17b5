"""`wsiproto cohort`: a real LocalCluster of worker processes over synthetic slides with a
random-init dualproto-tiny model: bad slides become manifest rows, reruns do no work, a worker
killed mid-slide does not lose it, transient errors are retried, SLURM job scripts carry the
requested resources, bad input is one line."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from standins import layout
from test_cli import assert_one_line_error, wsiproto

W, H = 1280, 1024  # 6 chunks of 512 label px at the model's 0.5 um/px: a few seconds a slide
ENV = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from wsiproto.model import create_model, save_model

    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(create_model("dualproto-tiny"), folder)
    return folder


@pytest.fixture(scope="module")
def cohort_inputs(tmp_path_factory):
    """4 good slides and a truncated one in a folder, and a path that does not exist."""
    from wsiproto.slide.synthetic import write_pyramidal_tiff

    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    slides.mkdir()
    for i in range(4):
        write_pyramidal_tiff(slides / f"case{i}.svs", W, H, layout(W, H), mpp=0.5, levels=2)
    data = (slides / "case0.svs").read_bytes()
    (slides / "corrupt.svs").write_bytes(data[: len(data) // 3])
    (slides / "notes.txt").write_text("not a slide; folder search skips it\n")
    return slides, root / "missing.svs"


def manifest_rows(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {Path(r["slide"]).name: r for r in csv.DictReader(fh)}


def test_cli_cohort_skip_errors_then_rerun_does_no_work(cohort_inputs, tiny_model, tmp_path):
    slides, missing = cohort_inputs
    out = tmp_path / "out"
    args = ("cohort", str(slides), str(missing), "--model", str(tiny_model), "--out", str(out),
            "--workers", "2", "--skip-errors", "--chunk-size", "512", "--quiet")
    proc = wsiproto(*args, env=ENV)
    assert proc.returncode == 1, proc.stderr  # went through all, but not all are done

    rows = manifest_rows(out)
    assert set(rows) == {"case0.svs", "case1.svs", "case2.svs", "case3.svs", "corrupt.svs",
                         "missing.svs"}
    done = {k for k, r in rows.items() if r["status"] == "done"}
    assert done == {f"case{i}.svs" for i in range(4)}
    assert "no such file" in rows["missing.svs"]["error"]
    assert rows["corrupt.svs"]["status"] == "failed"
    assert "truncated or corrupt" in rows["corrupt.svs"]["error"]
    for name in ("missing.svs", "corrupt.svs"):
        assert "\n" not in rows[name]["error"]
        tb = (out / rows[name]["traceback"]).read_text()
        assert "Traceback" in tb and "WsiprotoError" in tb
    for name in done:
        stem = name.split(".")[0]
        summary = json.loads((out / stem / "summary.json").read_text())
        assert rows[name]["config_hash"] == summary["config_hash"]
        for rel in rows[name]["outputs"].split(";"):
            assert (out / rel).exists(), rel
        assert float(rows[name]["duration_s"]) > 0
    # Each worker process loaded the model once and kept it for its later slides.
    loads = [r for r in rows.values() if float(r["model_load_s"] or 0) > 0]
    assert 1 <= len(loads) <= 2

    with open(out / "cohort.csv", newline="") as fh:
        table = {Path(r["slide"]).name: r for r in csv.DictReader(fh)}
    assert set(table) == set(rows)
    for name in done:
        pct = sum(float(table[name][f"{c}_pct"]) for c in
                  ("TUM", "STR", "LYM", "NEC", "background"))
        assert abs(pct - 100) < 0.01
        assert float(table[name]["tissue_area_mm2"]) > 0 and float(table[name]["TUM_mm2"]) >= 0
    assert table["corrupt.svs"]["TUM_mm2"] == "" and table["corrupt.svs"]["status"] == "failed"
    assert "4 done (4 run now, 0 already done), 2 failed" in proc.stdout

    stamps = {n: (out / n.split(".")[0] / "summary.json").stat().st_mtime_ns for n in done}
    again = wsiproto(*args, env=ENV)
    assert again.returncode == 1, again.stderr
    assert "4 of 6 slide(s) already done" in again.stderr
    assert "4 done (0 run now, 4 already done), 2 failed" in again.stdout
    assert stamps == {n: (out / n.split(".")[0] / "summary.json").stat().st_mtime_ns
                      for n in done}
    rows2 = manifest_rows(out)
    assert {k: rows2[k]["finished"] for k in done} == {k: rows[k]["finished"] for k in done}
    assert rows2["corrupt.svs"]["status"] == "failed"  # failed slides are tried again


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes, one thread each, as `wsiproto cohort` starts."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def test_worker_killed_mid_slide_still_finishes(client, cohort_inputs, tiny_model, tmp_path):
    from wsiproto.cohort import run_cohort
    from wsiproto.segment import SegmentOptions

    slides, _ = cohort_inputs
    good = sorted(slides.glob("case*.svs"))
    out = tmp_path / "out"
    pids = client.run(os.getpid)  # worker address -> pid
    killed: list[tuple[str, str]] = []
    stop = threading.Event()

    def kill_a_worker_mid_slide():
        """SIGKILL the worker process running a slide that has finished chunks but no result."""
        while not stop.is_set():
            for done_dir in out.glob("*/.partial/done"):
                stem = done_dir.parent.parent.name
                if not any(done_dir.iterdir()) or (out / stem / "summary.json").exists():
                    continue
                for addr, keys in client.processing().items():
                    if addr in pids and any(f"segment-{stem}-" in str(k) for k in keys):
                        os.kill(pids[addr], signal.SIGKILL)
                        killed.append((stem, addr))
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker_mid_slide, daemon=True)
    killer.start()
    try:
        result = run_cohort(good, SegmentOptions(out=out, chunk=512), model=tiny_model,
                            device="cpu", client=client, skip_errors=True, progress=False,
                            echo=lambda m: None)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no slide was caught mid-run"
    assert result.all_done and result.counts["done"] == 4 and result.ran == 4
    stem, dead = killed[0]
    row = manifest_rows(out)[f"{stem}.svs"]
    assert row["status"] == "done" and row["worker"] != dead
    summary = json.loads((out / stem / "summary.json").read_text())
    # The rescheduled task resumed the slide: chunks finished before the kill were not redone.
    assert summary["chunks"]["run_now"] < summary["chunks"]["visited"]
    assert not (out / stem / ".partial").exists()


def test_without_skip_errors_the_first_failure_stops_the_run(client, cohort_inputs, tiny_model,
                                                             tmp_path):
    from wsiproto.cohort import run_cohort
    from wsiproto.segment import SegmentOptions

    slides, missing = cohort_inputs
    result = run_cohort([missing, *sorted(slides.glob("case*.svs"))],
                        SegmentOptions(out=tmp_path, chunk=512), model=tiny_model, device="cpu",
                        client=client, progress=False, echo=lambda m: None)
    assert result.stopped_early and not result.all_done
    assert result.failed[0][0] == str(missing) and "no such file" in result.failed[0][1]
    assert manifest_rows(tmp_path)["missing.svs"]["status"] == "failed"


def test_transient_errors_are_retried(cohort_inputs, tiny_model, tmp_path, monkeypatch):
    """A non-WsiprotoError is retried ``retries`` times (threads cluster: the patch is seen)."""
    from distributed import Client, LocalCluster

    from wsiproto import cohort
    from wsiproto.segment import SegmentOptions

    slides, _ = cohort_inputs
    real = cohort.worker_model
    calls = {"n": 0}

    def flaky(spec):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(spec)

    monkeypatch.setattr(cohort, "worker_model", flaky)
    opts = SegmentOptions(out=tmp_path, chunk=512)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:
        result = cohort.run_cohort([slides / "case1.svs"], opts, model=tiny_model, device="cpu",
                                   client=c, retries=1, progress=False, echo=lambda m: None)
        assert result.all_done
        assert manifest_rows(tmp_path)["case1.svs"]["attempts"] == "2"
        calls["n"] = 0
        (tmp_path / "manifest.csv").unlink()
        import shutil

        shutil.rmtree(tmp_path / "case1")
        result = cohort.run_cohort([slides / "case1.svs"], opts, model=tiny_model,
                                   device="cpu", client=c, retries=0, skip_errors=True,
                                   progress=False, echo=lambda m: None)
    assert result.counts["failed"] == 1
    assert manifest_rows(tmp_path)["case1.svs"]["error"].startswith("RuntimeError: CUDA error")


def test_slurm_cluster_job_script_carries_the_resources():
    from wsiproto.cohort import SlurmOptions, slurm_cluster

    cluster = slurm_cluster(SlurmOptions(
        queue="gpu", account="pathology", cores=8, memory="48GB", walltime="06:00:00", gpus=1,
        job_extra=["--qos=long"], prologue=["module load cuda/12.4"]))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A pathology", "#SBATCH --cpus-per-task=8",
                 "#SBATCH -t 06:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --qos=long",
                 "module load cuda/12.4"):
        assert line in script, (line, script)
    assert "#SBATCH --mem=45G" in script  # 48 GB = 44.7 GiB, as dask-jobqueue writes it
    worker = script.strip().splitlines()[-1]
    assert "--resources GPU=1" in worker
    assert worker.rstrip().endswith("--nthreads 1 --resources GPU=1")  # one slide per GPU


def test_cli_slurm_print_script():
    proc = wsiproto("cohort", "x.svs", "--slurm", "--slurm-queue", "a100", "--slurm-gpus", "2",
                    "--slurm-cores", "16", "--slurm-memory", "64GB", "--slurm-walltime",
                    "12:00:00", "--slurm-print-script", env=ENV)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "#SBATCH -p a100" in out and "#SBATCH --gres=gpu:2" in out
    assert "#SBATCH --cpus-per-task=16" in out and "#SBATCH -t 12:00:00" in out
    assert "--nworkers 2" in out and "--resources GPU=1" in out  # one worker per GPU


def test_inputs_from_folders_and_csv(cohort_inputs, tmp_path):
    from wsiproto.cohort import discover_slides

    slides, _missing = cohort_inputs
    found = discover_slides([slides])
    assert [p.name for p in found] == ["case0.svs", "case1.svs", "case2.svs", "case3.svs",
                                       "corrupt.svs"]
    table = tmp_path / "cohort.csv"
    table.write_text(f"patient,Slide\np1,{slides / 'case2.svs'}\np2,case9.svs\np3,\n")
    got = discover_slides([table, slides / "case2.svs"])
    assert got == [slides / "case2.svs", tmp_path / "case9.svs"]  # relative to the CSV


def test_manifest_is_written_atomically_and_read_back(tmp_path):
    from wsiproto.cohort import MANIFEST_FIELDS, Manifest

    m = Manifest(tmp_path)
    m.update("/a.svs", status="done", duration_s=1.23456, error="")
    m.update("/b.svs", status="failed", error="b.svs: no such file")
    m.save(force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]  # no temporary left
    back = Manifest(tmp_path)
    assert list(back.rows) == ["/a.svs", "/b.svs"]
    assert back.get("/a.svs")["duration_s"] == "1.235"
    assert set(back.get("/b.svs")) == set(MANIFEST_FIELDS)


def test_no_slides_found_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = wsiproto("cohort", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), env=ENV)
    assert_one_line_error(proc, "no slides found", str(tmp_path / "empty"))


def test_csv_without_slide_column_is_one_line(tmp_path):
    table = tmp_path / "list.csv"
    table.write_text("path,label\na.svs,1\n")
    proc = wsiproto("cohort", str(table), "--out", str(tmp_path / "o"), env=ENV)
    assert_one_line_error(proc, "no `slide` column", "path, label", str(table))
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"slide\n\xe9\xff\xfe.svs\n")
    proc = wsiproto("cohort", str(bad), "--out", str(tmp_path / "o"), env=ENV)
    assert_one_line_error(proc, "cannot read the CSV", str(bad))


def test_unwritable_out_is_one_line(cohort_inputs, tmp_path):
    slides, _ = cohort_inputs
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    proc = wsiproto("cohort", str(slides), "--out", str(blocker / "out"), env=ENV)
    assert_one_line_error(proc, "is a file, not a folder", str(blocker))
