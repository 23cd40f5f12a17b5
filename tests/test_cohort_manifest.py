"""The cohort's bookkeeping without a cluster: inputs, output folders, the manifest's journal,
the lock, the summary table."""

from __future__ import annotations

import pytest


def test_inputs_from_folders_and_csv(tmp_path):
    from wsiproto.cohort import discover_slides

    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    (slides / ".hidden").mkdir()
    for name in ("case0.svs", "case1.SVS", "sub/case2.ndpi", ".hidden/x.svs", ".y.svs",
                 "notes.txt", "loose.dcm"):
        (slides / name).write_bytes(b"")
    (slides / "series").mkdir()  # a DICOM WSI series: one slide, not a folder to search
    for i in range(2):
        (slides / "series" / f"{i}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    found = discover_slides([slides])
    assert [p.name for p in found] == ["case0.svs", "case1.SVS", "series", "case2.ndpi"]
    assert discover_slides([slides / "series"]) == [slides / "series"]
    table = tmp_path / "cohort.csv"
    table.write_text(f"patient,Slide\np1,{slides / 'case0.svs'}\np2,case9.svs\np3,\n")
    got = discover_slides([table, slides / "case0.svs"])
    assert got == [slides / "case0.svs", tmp_path / "case9.svs"]  # relative to the CSV
    assert "case2.ndpi" not in [p.name for p in discover_slides([slides], exclude=slides / "sub")]


def test_folders_are_distinct_stable_and_never_the_cohorts_own(tmp_path):
    from wsiproto.cohort import assign_folders

    names = ["/a/case.svs", "/b/case.svs", "/c/CASE.tif", "/d/manifest.csv.svs",
             "/e/report.html.ndpi", "/f/...svs", "/g/case-x.svs"]
    first = assign_folders(names)
    folders = [f.folder for f in first]
    assert folders[0] == "case" and first[0].note == ""
    assert folders[1].startswith("case-") and folders[1].endswith("/case")
    assert "is the folder of /a/case.svs" in first[1].note
    assert folders[2].endswith("/CASE")  # case-insensitive file systems: the same folder
    assert folders[3].startswith("manifest.csv-") and "cohort's own file" in first[3].note
    assert folders[4].startswith("report.html-")
    assert "/" not in folders[5] and "not a safe folder name" in first[5].note
    assert len({f.split("/")[0].lower() for f in folders}) == len(names)
    # Another run into the same OUT, inputs in another order: every slide keeps its folder.
    previous = {f.slide: (f.folder, f.note) for f in first}
    again = {f.slide: f.folder for f in assign_folders(list(reversed(names)), previous)}
    assert again == dict(zip(names, folders))
    # A new slide never takes a folder recorded for another.
    new = assign_folders(["/h/case.svs"], previous)[0]
    assert new.folder.startswith("case-") and new.folder not in folders
    assert first[1].out(tmp_path) == tmp_path / folders[1].split("/")[0]


def test_manifest_journal_and_rewrite(tmp_path):
    from wsiproto.cohort import MANIFEST_FIELDS, Manifest

    m = Manifest(tmp_path, min_compact_rows=4)
    m.update("/a.svs", status="done", duration_s=1.23456, error="")
    m.update("/b.svs", status="failed", error='b.svs: no such file, "quoted"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest-journal.csv"]
    back = Manifest(tmp_path)  # a reader (the next run) sees journal rows at once
    assert list(back.rows) == ["/a.svs", "/b.svs"]
    assert back.get("/a.svs")["duration_s"] == "1.235"
    assert back.get("/b.svs")["error"] == 'b.svs: no such file, "quoted"'
    assert set(back.get("/b.svs")) == set(MANIFEST_FIELDS)
    m.update("/a.svs", status="failed")
    m.update("/c.svs", status="queued")  # the 4th row in the journal: folded in
    assert m.rewrites == 1 and not (tmp_path / "manifest-journal.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]  # no temporary left
    assert Manifest(tmp_path).get("/a.svs")["status"] == "failed"
    m.close()


def test_manifest_ignores_a_journal_line_cut_by_a_crash(tmp_path):
    from wsiproto.cohort import Manifest

    m = Manifest(tmp_path)
    m.update("/a.svs", status="done")
    m.close()
    with open(tmp_path / "manifest-journal.csv", "a") as fh:
        fh.write("/b.svs,do")  # the client died in the middle of a line
    m = Manifest(tmp_path)
    assert list(m.rows) == ["/a.svs"]
    m.update("/c.svs", status="done")  # starts on a line of its own
    m.close()
    assert list(Manifest(tmp_path).rows) == ["/a.svs", "/c.svs"]


def test_manifest_rewrite_cost_stays_flat_per_slide(tmp_path):
    """2 updates per slide for 3,000 slides: the rows written by rewrites grow linearly."""
    from wsiproto.cohort import Manifest

    m = Manifest(tmp_path)
    for n in (1000, 3000):
        for i in range(n):
            m.update(f"/{n}/{i}.svs", status="queued")
        for i in range(n):
            m.update(f"/{n}/{i}.svs", status="done", duration_s=1.0)
        m.compact()
        per_update = m.rows_rewritten / (2 * (len(m.rows)))
        assert per_update < 5, (n, m.rows_rewritten)
    m.close()


def test_cohort_lock_is_one_run_per_folder(tmp_path):
    from wsiproto.cohort import CohortLock
    from wsiproto.errors import WsiprotoError

    with CohortLock(tmp_path):
        with pytest.raises(WsiprotoError, match="another wsiproto cohort run"):
            with CohortLock(tmp_path):
                pass
    with CohortLock(tmp_path):  # released: the next run takes it
        pass


def test_summary_table_keeps_whole_class_names(tmp_path):
    from wsiproto.cohort.report import summary_table

    rows = [{"slide": "/s/a.svs", "status": "done", "tissue_area_mm2": "1.5",
             "TUM_pct": "10", "background_pct": "90"},
            {"slide": "/s/b.svs", "status": "failed", "tissue_area_mm2": ""}]
    lines = summary_table(rows, 10, tmp_path / "cohort.csv")
    assert lines[0].split()[-4:] == ["TUM", "%", "background", "%"]
    assert lines[2].rstrip().endswith("90.0") and len(lines[2]) == len(lines[0])


def test_walltimes():
    from wsiproto.cohort.cluster import parse_walltime

    assert parse_walltime("04:00:00") == 4 * 3600
    assert parse_walltime("30") == 1800 and parse_walltime("1:30") == 90
    assert parse_walltime("2-12") == 60 * 3600 and parse_walltime("1-00:00:05") == 86405
