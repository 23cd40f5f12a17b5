"""Regenerate README's demo pictures from a real `wsiproto demo` run: the overlay
(docs/demo-overlay.png) and the results opened in napari (docs/demo-napari.png).

    python examples/readme_demo_image.py [--out runs/demo] [--width 560]

Runs ``wsiproto demo --out DIR`` (the sample slide, the bundled default model), scales the
demo's own ``overlay.png`` (thumbnail + class map + legend) to ``--width`` pixels, then opens
the OME-Zarr in napari with napari-ome-zarr (under ``xvfb-run`` when there is no display),
shows the labels layer over the image at half opacity, and saves napari's canvas. Nothing is
drawn by hand: rerun this after the model changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NAPARI = r"""
import sys
import numpy as np
import napari
from PIL import Image

from napari.settings import get_settings
get_settings().application.gui_notification_level = "none"
viewer = napari.Viewer(show=True)
viewer.window.resize(900, 1000)
viewer.open(sys.argv[1], plugin="napari-ome-zarr")
for layer in viewer.layers:
    if type(layer).__name__ == "Labels":
        layer.visible, layer.opacity = True, 0.5
viewer.reset_view()
Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]).save(
    sys.argv[2])
viewer.close()
"""


def scaled(src: Path, target: Path, width: int) -> None:
    from PIL import Image

    image = Image.open(src).convert("RGB")
    height = round(image.height * width / image.width)
    target.parent.mkdir(exist_ok=True)
    image.resize((width, height), Image.LANCZOS).save(target, optimize=True)
    print(f"wrote {target.relative_to(ROOT)} ({width} x {height}, "
          f"{target.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--width", type=int, default=560)
    args = ap.parse_args()

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsiproto", "demo", "--out", args.out, "--overwrite",
                    "--quiet"], check=True)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    folder = Path(args.out) / "CMU-1-Small-Region"
    scaled(folder / "overlay.png", ROOT / "docs" / "demo-overlay.png", args.width)

    shot = Path(args.out) / "napari.png"
    command = [sys.executable, "-c", NAPARI, str(folder / "CMU-1-Small-Region.ome.zarr"),
               str(shot)]
    if not os.environ.get("DISPLAY"):
        if shutil.which("xvfb-run") is None:
            sys.exit("no display and no xvfb-run: install xvfb for the napari picture")
        command = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *command]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    scaled(shot, ROOT / "docs" / "demo-napari.png", args.width)


if __name__ == "__main__":
    main()
