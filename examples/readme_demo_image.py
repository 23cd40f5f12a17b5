"""Regenerate README's demo picture (docs/demo-overlay.png) from a real `wsiproto demo` run.

    python examples/readme_demo_image.py [--out runs/demo] [--width 560]

Runs ``wsiproto demo --out DIR`` (the sample slide, the bundled default model), then scales the
demo's own ``overlay.png`` (thumbnail + class map + legend) to ``--width`` pixels and writes it
to ``docs/demo-overlay.png``. Nothing is drawn by hand: rerun this after the model changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--width", type=int, default=560)
    args = ap.parse_args()

    from PIL import Image

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsiproto", "demo", "--out", args.out, "--overwrite",
                    "--quiet"], check=True)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    overlay = Path(args.out) / "CMU-1-Small-Region" / "overlay.png"
    image = Image.open(overlay).convert("RGB")
    height = round(image.height * args.width / image.width)
    target = ROOT / "docs" / "demo-overlay.png"
    target.parent.mkdir(exist_ok=True)
    image.resize((args.width, height), Image.LANCZOS).save(target, optimize=True)
    print(f"wrote {target.relative_to(ROOT)} ({args.width} x {height}, "
          f"{target.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
