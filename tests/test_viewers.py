"""Results as users look at them (issue 17): napari opens the OME-Zarr with an Image and a
Labels layer in the file's colours (a real napari under a virtual X display), and the stored
image is the whole slide region.

napari runs in its own process on an Xvfb display: ``Viewer(show=True)``, because an offscreen
canvas rendered black. Skipped with the reason where Xvfb cannot start or napari is absent;
CI installs both (``.ci/run``: xvfb, Mesa; the dev extra: napari, napari-ome-zarr, PyQt6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import shared_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

NAPARI_SCRIPT = r"""
import json, sys
import numpy as np
import napari
from PIL import Image

store, shot = sys.argv[1], sys.argv[2]
viewer = napari.Viewer(show=True)
viewer.open(store, plugin="napari-ome-zarr")
labels = [l for l in viewer.layers if type(l).__name__ == "Labels"]
images = [l for l in viewer.layers if type(l).__name__ == "Image"]
out = {"layers": [[type(l).__name__, l.name] for l in viewer.layers]}
if labels:
    lab = labels[0]
    out["visible_at_open"] = bool(lab.visible)
    out["colormap"] = {str(k): [round(float(c), 4) for c in v]
                       for k, v in lab.colormap.color_dict.items() if k is not None}
    for layer in images:
        layer.visible = False
    # napari-ome-zarr adds labels hidden ("not visible initially"): a user ticks the eye
    lab.visible, lab.opacity, lab.blending = True, 1.0, "opaque"
    viewer.reset_view()
    img = viewer.screenshot(canvas_only=True, flash=False)
    Image.fromarray(np.asarray(img)[..., :3]).save(shot)
viewer.close()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def display():
    """An Xvfb display for the module (its number in DISPLAY)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb xauth libgl1-mesa-dri)")
    pytest.importorskip("napari", reason="napari is not installed (pip install -e '.[dev]')")
    pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed")
    for number in range(91, 120):
        if Path(f"/tmp/.X{number}-lock").exists():
            continue
        proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1280x1024x24",
                                 "-nolisten", "tcp"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if Path(f"/tmp/.X11-unix/X{number}").exists():
                break
            time.sleep(0.05)
        if proc.poll() is None:
            yield f":{number}"
            proc.terminate()
            proc.wait(10)
            return
    pytest.skip("Xvfb could not start a display here")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The sample slide segmented by the bundled model, as NGFF 0.5 and 0.4."""
    slide = shared_file("slides", "CMU-1-Small-Region.svs")
    root = tmp_path_factory.mktemp("viewers")
    out = {}
    for version in ("0.5", "0.4"):
        proc = subprocess.run([sys.executable, "-m", "wsiproto", "segment", str(slide), "--out",
                               str(root / version), "--ngff-version", version, "--quiet"],
                              capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out[version] = root / version / "CMU-1-Small-Region"
    return out


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_napari_opens_image_and_labels_in_the_files_colours(display, results, version,
                                                              tmp_path):
    folder = results[version]
    store = folder / "CMU-1-Small-Region.ome.zarr"
    shot = tmp_path / "labels.png"
    proc = subprocess.run([sys.executable, "-c", NAPARI_SCRIPT, str(store), str(shot)],
                          capture_output=True, text=True, timeout=300,
                          env={**ENV, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb",
                               "NAPARI_CONFIG": str(tmp_path / "napari.yaml")})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    kinds = [kind for kind, _ in result["layers"]]
    assert "Image" in kinds and kinds.count("Labels") == 1, result["layers"]

    meta = zarr.open_group(str(store), mode="r")["labels/tissue"].attrs.asdict()
    image_label = (meta["ome"] if version == "0.5" else meta)["image-label"]
    for entry in image_label["colors"]:
        want = [c / 255 for c in entry["rgba"]]
        got = result["colormap"][str(entry["label-value"])]
        assert got == pytest.approx(want, abs=1e-3), entry

    # The screenshot shows every class the summary reports on the tissue, in its colour.
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert pixels.std(0).max() > 10, "the screenshot is blank"
    summary = json.loads((folder / "summary.json").read_text())
    colours = {c["name"]: c["color"] for c in summary["labels"] if "color" in c}
    for name, share in summary["class_percent_of_tissue"].items():
        if share < 0.5:
            continue
        hits = np.all(pixels == np.asarray(colours[name]), axis=1).sum()
        assert hits > 20, f"{name} ({share:.1f}% of the tissue) is not on the screenshot"


def test_the_image_group_is_the_whole_slide(results):
    """Level 2 of the stored image equals the slide read at that scale everywhere: tissue or
    not, no blank rectangles (mean abs difference < 3)."""
    from wsiproto.slide import Slide

    store = results["0.5"] / "CMU-1-Small-Region.ome.zarr"
    level2 = zarr.open_group(str(store), mode="r")["2"][...]  # (c, y, x)
    summary = json.loads((results["0.5"] / "summary.json").read_text())
    ds = summary["label_frame"]["level0_px_per_label_px"] * 4
    with Slide(shared_file("slides", "CMU-1-Small-Region.svs")) as slide:
        h, w = level2.shape[1:]
        ref = slide.read_region((0, 0), (w, h), downsample=ds)
    diff = np.abs(np.moveaxis(level2, 0, 2).astype(int) - ref.astype(int))
    assert diff.mean() < 3, diff.mean()
    # and no 64x64 block of it is fill-white where the slide is not
    blocks = diff[: h // 64 * 64, : w // 64 * 64].reshape(h // 64, 64, w // 64, 64, 3)
    assert blocks.mean(axis=(1, 3, 4)).max() < 12
