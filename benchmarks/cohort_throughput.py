"""Cohort throughput: `wsiproto cohort` (LocalCluster) against `wsiproto segment` run serially.

    python benchmarks/cohort_throughput.py [--slides 6] [--size 2048] [--workers 1,2]
                                           [--model MODEL_DIR] [--workdir DIR]

Writes ``--slides`` synthetic H&E-like slides (``--size`` px square at 0.5 um/px), then times,
as a user would run them (real processes, wall clock):

* serial: one ``wsiproto segment SLIDE`` process per slide, one after the other (each pays
  Python start-up and the model load);
* cohort: ``wsiproto cohort FOLDER --workers N`` for each N (cluster start-up included).

Prints slides/hour for each and the speed-up over serial. Without ``--model`` a random-init
``dualproto-tiny`` is used: the numbers then measure the pipeline and the cluster, not a
production backbone (with a ViT-B model the inference share, and the GPU, dominate).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_slides(folder: Path, n: int, size: int) -> list[Path]:
    from wsiproto.slide.synthetic import blob_layout, write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"bench{i:03d}.svs"
        if not p.exists():
            write_pyramidal_tiff(p, size, size, blob_layout(size, size, seed=i), mpp=0.5, levels=3)
        paths.append(p)
    return paths


def wsiproto(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wsiproto", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"wsiproto {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=2048, help="slide side in px (0.5 um/px)")
    ap.add_argument("--workers", default="1,2", help="cohort worker processes to try")
    ap.add_argument("--model", default=None, help="model folder (default: random dualproto-tiny)")
    ap.add_argument("--workdir", default=None, help="where slides and outputs go (default: temp)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    slides = make_slides(work / "slides", args.slides, args.size)
    model = args.model
    if model is None:
        from wsiproto.model import create_model, save_model

        model = str(work / "tiny")
        if not (Path(model) / "config.json").exists():
            save_model(create_model("dualproto-tiny"), model)
    common = ["--model", model, "--quiet"]

    print(f"{len(slides)} slides of {args.size}x{args.size} px at 0.5 um/px; "
          f"{os.cpu_count()} CPU cores; model {model}")
    results = []
    out = work / "serial"
    shutil.rmtree(out, ignore_errors=True)
    total = sum(wsiproto("segment", str(s), "--out", str(out), *common) for s in slides)
    results.append(("wsiproto segment, serial", total))
    for n in [int(x) for x in args.workers.split(",") if x.strip()]:
        out = work / f"cohort-{n}"
        shutil.rmtree(out, ignore_errors=True)
        dt = wsiproto("cohort", str(work / "slides"), "--out", str(out), "--workers", str(n),
                      *common)
        results.append((f"wsiproto cohort --workers {n}", dt))

    base = results[0][1]
    print(f"{'run':<32} {'wall s':>8} {'slides/hour':>12} {'speed-up':>9}")
    for name, dt in results:
        print(f"{name:<32} {dt:>8.1f} {3600 * len(slides) / dt:>12.0f} {base / dt:>8.2f}x")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
