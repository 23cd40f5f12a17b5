"""The `wsiproto` command: help, info, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import shared_file


def wsiproto(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed command as a user would (a real process: exit code, stdout, stderr)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "wsiproto", *args], capture_output=True,
                          text=True, env=full_env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("wsiproto: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_shows_an_example_for_each_command():
    proc = wsiproto("--help")
    assert proc.returncode == 0
    for command in ("info", "sample", "demo"):
        assert f"wsiproto {command}" in proc.stdout
        sub = wsiproto(command, "--help")
        assert sub.returncode == 0 and "example:" in sub.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("wsiproto", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
    assert exe, "the wsiproto console script is not on PATH"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("wsiproto ")


def test_info_json_on_cmu():
    path = shared_file("slides", "CMU-1-Small-Region.svs")
    proc = wsiproto("info", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["width"], info["height"]) == (2220, 2967)
    assert info["mpp"] == pytest.approx(0.499)
    assert info["level_count"] == 1
    assert info["objective_power"] == 20
    assert info["backend"] == "openslide" and info["vendor"] == "aperio"
    assert info["bounds"] == {"x": 0, "y": 0, "width": 2220, "height": 2967}
    assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}
    assert 0.15 < info["tissue_fraction"] < 0.5


def test_info_text_unknown_mpp():
    path = shared_file("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    proc = wsiproto("info", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "unknown" in proc.stdout and "4443 x 3567" in proc.stdout


def test_info_on_synthetic_with_backend_choice(synthetic_svs):
    path, _ = synthetic_svs
    proc = wsiproto("info", str(path), "--json", "--backend", "tiffslide")
    info = json.loads(proc.stdout)
    assert info["backend"] == "tiffslide" and info["level_count"] == 3 and info["mpp"] == 0.5


def _truncated_svs(tmp_path):
    src = shared_file("slides", "CMU-1-Small-Region.svs")
    bad = tmp_path / "truncated.svs"
    bad.write_bytes(src.read_bytes()[:1_000_000])  # cut before the directory at ~1.27 MB
    return bad


@pytest.mark.parametrize("case,needles", [
    ("missing", ("no such file",)),
    ("directory", ("is a directory",)),
    ("zero-byte", ("empty file",)),
    ("text-as-svs", ("text file",)),
    ("random-bytes", ("unsupported",)),
    ("truncated-svs", ("truncated or corrupt",)),
    ("dicom-unsupported", ("DICOM",)),
])
def test_bad_input_is_one_line_exit_2(tmp_path, case, needles):
    if case == "missing":
        path = tmp_path / "nope.svs"
    elif case == "directory":
        path = tmp_path / "a_folder.svs"
        path.mkdir()
    elif case == "zero-byte":
        path = tmp_path / "empty.svs"
        path.touch()
    elif case == "text-as-svs":
        path = tmp_path / "notes.svs"
        path.write_text("patient list\nthis is not a slide\n")
    elif case == "random-bytes":
        path = tmp_path / "noise.ndpi"
        path.write_bytes(os.urandom(8192).replace(b"II*", b"xx*"))
    elif case == "truncated-svs":
        path = _truncated_svs(tmp_path)
    else:
        path = shared_file("slides", "TCGA-XK-AAJU-small.dcm")
        import openslide

        try:
            openslide.OpenSlide(str(path)).close()
            pytest.skip("this OpenSlide reads the DICOM file; it is not an unsupported format here")
        except openslide.OpenSlideError:
            pass
    proc = wsiproto("info", str(path))
    assert_one_line_error(proc, str(path), *needles)


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "empty.svs"
    path.touch()
    proc = wsiproto("--debug", "info", str(path))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "WsiprotoError" in proc.stderr


def test_bad_mpp_value(synthetic_svs):
    path, _ = synthetic_svs
    assert_one_line_error(wsiproto("info", str(path), "--mpp", "-1"), "--mpp")
