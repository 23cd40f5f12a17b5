"""What several benchmarks share: a work folder and a model folder (the user's, or a random
model of a preset: throughput does not depend on the weights)."""

from __future__ import annotations

import tempfile
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
