"""`wsiproto cohort` on a real LocalCluster of worker processes with the bundled model over
synthetic slides: bad slides become manifest rows, reruns do no work, transient errors are
retried, every server listens on 127.0.0.1, slide names never lead outside --out, bad input is
one line. (A worker killed mid-slide: test_cohort_scheduler.py and test_cohort_overhead.py.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from cohort_helpers import (listening, manifest_rows, popen_wsiproto, tree, truncated_copy,
                            write_slides)
from test_cli import assert_one_line_error, wsiproto

ENV = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cohort_inputs(tmp_path_factory):
    """4 good slides (6 chunks of 512 label px each) and a truncated one in a folder, and a
    path that does not exist."""
    root = tmp_path_factory.mktemp("cohort")
    slides = root / "slides"
    good = write_slides(slides, [f"case{i}.svs" for i in range(4)])
    truncated_copy(good[0], slides / "corrupt.svs")
    (slides / "notes.txt").write_text("not a slide; folder search skips it\n")
    return slides, root / "missing.svs"


def run_watching_sockets(args: list[str]) -> tuple[object, set]:
    """Run the command; meanwhile collect the addresses its processes listen on."""
    proc = popen_wsiproto(*args)
    seen: set = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(listening(proc.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    finally:
        stop.set()
        watcher.join(5)
    return proc, seen


def test_cli_cohort_skip_errors_then_rerun_does_no_work(cohort_inputs, tmp_path):
    slides, missing = cohort_inputs
    out = tmp_path / "out"
    args = ["cohort", str(slides), str(missing), "--out", str(out), "--workers", "2",
            "--skip-errors", "--chunk-size", "512"]
    held = socket.socket()
    try:  # the dashboard's usual port taken: a free one is used, without dask's warning
        held.bind(("127.0.0.1", 8787))
        held.listen()
    except OSError:
        pass  # someone else holds it already
    try:
        proc, seen = run_watching_sockets(args)
    finally:
        held.close()
    err = proc.stderr_text
    assert proc.returncode == 1, err  # went through all, but not all are done

    # Every server the cohort started listened on 127.0.0.1 only (scheduler, dashboard,
    # workers and nannies), and the dashboard link names where it is.
    assert len(seen) >= 4 and {ip for ip, _ in seen} == {"127.0.0.1"}, seen
    dash = [ln for ln in err.splitlines() if "dask dashboard: http://127.0.0.1:" in ln]
    assert len(dash) == 1 and ":8787/" not in dash[0]
    assert "already in use" not in err
    # Without a terminal: no progress bar, one line per slide, every line ours.
    assert all(ln.startswith("wsiproto: ") for ln in err.splitlines()), err
    for i in range(4):
        assert err.count(f"done   {slides / f'case{i}.svs'} (") == 1, err

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
        assert rows[name]["folder"] == name.split(".")[0] and rows[name]["folder_note"] == ""
        summary = json.loads((out / rows[name]["folder"] / "summary.json").read_text())
        assert rows[name]["config_hash"] == summary["config_hash"]
        for rel in rows[name]["outputs"].split(";"):
            assert (out / rel).exists(), rel
        assert float(rows[name]["duration_s"]) > 0 and rows[name]["attempts"] == "1"
    # Each worker process loaded the model once and kept it for its later slides.
    loads = [r for r in rows.values() if float(r["model_load_s"] or 0) > 0]
    assert 1 <= len(loads) <= 2

    import csv

    with open(out / "cohort.csv", newline="") as fh:
        table = {Path(r["slide"]).name: r for r in csv.DictReader(fh)}
    assert set(table) == set(rows)
    for name in done:
        pct = sum(float(table[name][f"{c}_pct"]) for c in
                  ("TUM", "STR", "LYM", "NEC", "background"))
        assert abs(pct - 100) < 0.01
        assert float(table[name]["tissue_area_mm2"]) > 0 and float(table[name]["TUM_mm2"]) >= 0
    assert table["corrupt.svs"]["TUM_mm2"] == "" and table["corrupt.svs"]["status"] == "failed"
    assert "4 done (4 run now, 0 already done), 2 failed" in proc.stdout_text
    assert "background %" in proc.stdout_text.splitlines()[0]  # the header is not cut
    page = (out / "report.html").read_text()
    assert page.count("<tr data-name=") == len(rows)

    stamps = {n: (out / n.split(".")[0] / "summary.json").stat().st_mtime_ns for n in done}
    again = wsiproto(*args, "--quiet", env=ENV)
    assert again.returncode == 1, again.stderr
    assert "4 of 6 slide(s) already done" in again.stderr
    assert "4 done (0 run now, 4 already done), 2 failed" in again.stdout
    assert stamps == {n: (out / n.split(".")[0] / "summary.json").stat().st_mtime_ns
                      for n in done}
    rows2 = manifest_rows(out)
    assert {k: rows2[k]["finished"] for k in done} == {k: rows[k]["finished"] for k in done}
    assert rows2["corrupt.svs"]["status"] == "failed"  # failed slides are tried again
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        ".cohort.lock", "cohort.csv", "manifest.csv", "report.html"]  # journal folded in


# Slide names that could lead outside --out or onto the cohort's own files, and names that
# meet in one folder: (file, expected folder: None = renamed by the engine, "nested" = one
# level down because the plain folder is taken or reserved).
NAMES = [
    ("...svs", None), ("..svs", None), (".svs", None), (".cohort.lock.svs", None),
    ("-rf.svs", None), ("x" * 240 + ".svs", None), ("manifest.csv.svs", "nested"),
    ("manifest-tracebacks.svs", "nested"), ("manifest-journal.csv.svs", "nested"),
    ("cohort.csv.svs", "nested"), ("report.html.svs", "nested"), ("a/case.svs", "case"),
    ("b/case.svs", "nested"), ("case.tif", "nested"), ("CASE.svs", "nested"),
]


def test_slide_names_never_lead_outside_out(tmp_path):
    """Nothing outside --out is created or changed, whatever the slides are called; every
    slide gets a folder of its own strictly inside --out, recorded in the manifest, and keeps
    it when the inputs come in another order."""
    parent = tmp_path / "work"
    paths = write_slides(parent / "slides", [n for n, _ in NAMES], width=512, height=512)
    out = parent / "out"
    before = tree(parent)
    args = ["cohort", *map(str, paths), "--out", str(out), "--chunk-size", "512",
            "--skip-errors", "--quiet"]
    proc = popen_wsiproto(*args, cwd=parent)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    after = tree(parent)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    assert not [k for k in after if k.startswith("out") and not k.startswith("out/")
                and k != "out"]

    rows = manifest_rows(out, key="path")
    folders = {}
    for path, (name, expected) in zip(paths, NAMES):
        row = rows[str(path)]
        assert row["status"] == "done", (name, row["error"])
        folder = (out / row["folder"]).resolve()
        assert folder.is_relative_to(out.resolve()) and folder != out.resolve(), name
        assert (folder / "summary.json").exists()
        last = row["folder"].rsplit("/", 1)[-1]
        if expected is None:
            assert "not a safe folder name" in row["folder_note"], (name, row)
        elif expected == "nested":
            assert row["folder"].count("/") == 1 and row["folder_note"], (name, row)
        else:
            assert row["folder"] == expected and row["folder_note"] == ""
        assert not last.startswith(".") and "/" not in last
        folders[name] = row["folder"]
    assert len({f.lower() for f in folders.values()}) == len(NAMES)
    for own in ("manifest.csv", "cohort.csv", "report.html"):
        assert (out / own).is_file()
    assert not (out / "manifest-tracebacks").exists()  # no failure, no tracebacks folder
    assert "case.svs -> case-" in stdout  # the summary lists the renamed folders

    again = wsiproto("cohort", *reversed(args[1:len(paths) + 1]), *args[len(paths) + 1:],
                     env=ENV)
    assert again.returncode == 0, again.stderr
    assert f"{len(NAMES)} of {len(NAMES)} slide(s) already done" in again.stderr
    assert {n: manifest_rows(out, key="path")[str(p)]["folder"]
            for p, (n, _) in zip(paths, NAMES)} == folders


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes, one thread each, as `wsiproto cohort` starts."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


def test_without_skip_errors_the_first_failure_stops_the_run(client, cohort_inputs, tmp_path):
    from wsiproto.cohort import run_cohort
    from wsiproto.segment import SegmentOptions

    slides, missing = cohort_inputs
    result = run_cohort([missing, *sorted(slides.glob("case*.svs"))],
                        SegmentOptions(out=tmp_path, chunk=512), device="cpu",
                        client=client, progress=False, echo=lambda m: None)
    assert result.stopped_early and not result.all_done
    assert result.failed[0][0] == str(missing) and "no such file" in result.failed[0][1]
    rows = manifest_rows(tmp_path)
    assert rows["missing.svs"]["status"] == "failed"
    assert result.counts.get("queued", 0) == 4 - result.counts.get("done", 0)


def test_transient_errors_are_retried(cohort_inputs, tmp_path, monkeypatch):
    """A non-WsiprotoError is retried ``retries`` times (threads cluster: the patch is seen)."""
    from distributed import Client, LocalCluster

    from wsiproto.cohort import run_cohort, worker
    from wsiproto.segment import SegmentOptions

    slides, _ = cohort_inputs
    real = worker.worker_model
    calls = {"n": 0}

    def flaky(spec):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(spec)

    monkeypatch.setattr(worker, "worker_model", flaky)
    opts = SegmentOptions(out=tmp_path, chunk=512)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        result = run_cohort([slides / "case1.svs"], opts, device="cpu", client=c, retries=1,
                            progress=False, echo=lambda m: None)
        assert result.all_done
        assert manifest_rows(tmp_path)["case1.svs"]["attempts"] == "2"
        calls["n"] = 0
        (tmp_path / "manifest.csv").unlink()
        import shutil

        shutil.rmtree(tmp_path / "case1")
        result = run_cohort([slides / "case1.svs"], opts, device="cpu", client=c, retries=0,
                            skip_errors=True, progress=False, echo=lambda m: None)
    assert result.counts["failed"] == 1
    assert manifest_rows(tmp_path)["case1.svs"]["error"].startswith("RuntimeError: CUDA error")


def test_slurm_cluster_job_script_carries_the_resources():
    from wsiproto.cohort import SlurmOptions, slurm_cluster

    cluster = slurm_cluster(SlurmOptions(
        queue="gpu", account="pathology", cores=8, memory="48GB", walltime="06:00:00", gpus=1,
        job_extra=["--qos=long"], prologue=["module load cuda/12.4"]), dashboard=None)
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
    assert "--no-dashboard" in worker  # workers on compute nodes open no web server
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


def test_bad_walltime_is_one_line(tmp_path):
    proc = wsiproto("cohort", str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), "--slurm",
                    "--slurm-walltime", "4h", env=ENV)
    assert_one_line_error(proc, "--slurm-walltime '4h' is not a SLURM time limit")


def test_workers_help_says_what_a_run_starts():
    from wsiproto.cohort import local_workers

    proc = wsiproto("cohort", "--help", env=ENV)
    assert "never more than the slides to run" in " ".join(proc.stdout.split())
    assert local_workers(1, 0) == 1 and local_workers(3, 0) <= 3
    assert local_workers(100, 0) >= min(2, os.cpu_count() or 1)


def test_a_second_run_into_the_same_out_is_refused(cohort_inputs, tmp_path):
    from wsiproto.cohort import CohortLock

    slides, _ = cohort_inputs
    tmp_path.mkdir(exist_ok=True)
    with CohortLock(tmp_path):
        proc = wsiproto("cohort", str(slides / "case0.svs"), "--out", str(tmp_path), env=ENV)
    assert_one_line_error(proc, "another wsiproto cohort run is writing to this folder",
                          str(tmp_path))


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
