"""Pseudo masks for a training split (`wsiproto pseudo-masks`): the input of a second-stage
fully supervised segmenter.

For every training patch: the model's class maps gated by the patch's own image-level labels
(``oracle``, the usual WSSS practice: the training labels are known) or by the model's
calibrated presence (``predicted``), argmax -> a palette PNG ``<stem>.png`` with the class
table's colours (index ``C`` = background), the same format as BCSS-WSSS masks.

Each PNG is written under a temporary name and renamed, so a rerun after an interruption skips
the finished files and redoes only the rest; ``manifest.json`` (model, data, protocol, class
pixel fractions) is written last, and a folder made from another model or protocol is left
alone unless ``overwrite``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.files import atomic_path, write_json_atomic


def save_palette_png(path: Path, mask: np.ndarray, palette: list[tuple[int, int, int]]) -> None:
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [v for rgb in palette for v in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_pseudo_masks(model, dataset, out: str | Path, *, protocol: str = "oracle",
                       tta: bool = False, crf: bool = False, batch_size: int = 16, device=None,
                       autocast: bool = False, overwrite: bool = False, source: str = "",
                       progress: Callable[[int], None] | None = None) -> dict:
    """Write one palette PNG per training patch into ``out``; returns the manifest."""
    from wsiproto.evaluate import predict_pairs

    out = Path(out).expanduser()
    table = dataset.table
    if dataset.num_classes != model.config.num_classes:
        raise WsiprotoError(f"the dataset has {dataset.num_classes} classes, the model "
                            f"{model.config.num_classes}", path=dataset.root,
                            hint="use a model trained on this dataset's class table")
    settings = {"model": source, "protocol": protocol, "tta": tta, "crf": crf,
                "classes": table.names, "data": str(dataset.root)}
    manifest_path = out / "manifest.json"
    stems = [Path(p).stem for p in dataset.paths]
    if len(set(stems)) != len(stems):
        raise WsiprotoError("two training patches share a file name", path=dataset.root,
                            hint="give patches unique names")
    if out.exists() and not out.is_dir():
        raise WsiprotoError("--out exists and is not a folder", path=out, hint="choose another --out")
    if manifest_path.is_file() or (out / ".settings.json").is_file():
        previous_path = manifest_path if manifest_path.is_file() else out / ".settings.json"
        previous = json.loads(previous_path.read_text(encoding="utf-8"))
        previous = previous.get("settings", previous)
        if previous != settings and not overwrite:
            raise WsiprotoError("the folder holds pseudo masks made with other settings", path=out,
                                hint="pass --overwrite to replace them, or choose another --out")
        if previous != settings:
            for stem in stems:
                (out / f"{stem}.png").unlink(missing_ok=True)
            manifest_path.unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise WsiprotoError("the folder is not empty", path=out,
                            hint="choose an empty --out, or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / ".settings.json", settings)
    except OSError as err:
        raise WsiprotoError(f"cannot write the output folder ({err.strerror or err})", path=out,
                            hint="choose a writable --out") from None
    manifest_path.unlink(missing_ok=True)

    palette = table.palette()
    counts = np.zeros(table.num_classes + 1, np.int64)
    todo = [i for i, s in enumerate(stems) if not (out / f"{s}.png").is_file()]
    done_before = len(stems) - len(todo)
    if progress is not None and done_before:
        progress(done_before)
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        pairs = [dataset[i] for i in idx]
        masks, _, _ = predict_pairs(model, pairs, protocols=(protocol,), tta=tta, crf=crf,
                                    device=device, autocast=autocast)
        for i, mask in zip(idx, masks[protocol]):
            counts += np.bincount(mask.ravel(), minlength=len(counts))[: len(counts)]
            save_palette_png(out / f"{stems[i]}.png", mask, palette)
        if progress is not None:
            progress(len(idx))
    total = counts.sum()
    names = table.names + [table.background_name]
    manifest = {"settings": settings, "masks": len(stems), "written_now": len(todo),
                "pixel_fraction_written_now": {n: round(float(c / total), 6) if total else None
                                               for n, c in zip(names, counts)},
                "palette": {n: list(c) for n, c in zip(names, palette)}}
    write_json_atomic(manifest_path, manifest)
    (out / ".settings.json").unlink(missing_ok=True)
    return manifest
