"""What several benchmarks share: a work folder, a model folder (the user's, or a random
model of a preset: throughput does not depend on the weights) and synthetic slides."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def work_folder(path: str | None, prefix: str) -> Path:
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def model_folder(model: str | None, preset: str, work: Path) -> Path:
    """``model``, or a random-init model of ``preset`` saved once under ``work``."""
    if model is not None:
        return Path(model)
    from wsiproto.model import create_model, save_model

    folder = work / f"{preset}-random"
    if not (folder / "config.json").exists():
        save_model(create_model(preset), folder)
    return folder


def synthetic_slide(work: Path, size: int, *, mpp: float, levels: int, seed: int) -> Path:
    """``work/synthetic-<size>.svs``: a square JPEG pyramid with blob tissue, written once
    (large ones take minutes) and reused by later runs."""
    from wsiproto.slide.synthetic import blob_layout, write_pyramidal_tiff

    slide = work / f"synthetic-{size}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        write_pyramidal_tiff(slide, size, size, blob_layout(size, size, seed=seed), mpp=mpp,
                             levels=levels)
        print(f"wrote {slide.name} ({slide.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return slide
