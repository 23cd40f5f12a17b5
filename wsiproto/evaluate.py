"""Evaluation of a DualProtoSeg model on a split with pixel masks, in both protocols.

One pass over the images computes the model's ungated class maps and class probabilities
(:func:`wsiproto.model.masks.class_maps`); each protocol then gates the same maps:

* ``oracle``: presence from the ground-truth image labels (a class is present when its mask has
  at least one pixel of it), as in the published BCSS-WSSS numbers;
* ``predicted``: presence from the model's own probabilities and its calibrated per-class
  thresholds, what a user gets on new tissue.

Images whose size differs from the model's tile size (e.g. WSSS4LUAD validation images of
217-4074 px) are resized to the tile for the model, and the class maps are resized back
(bilinear) so the metrics are computed at the mask's own resolution, pixel for pixel.

Metrics come from one ``(C + 1) x (C + 1)`` confusion matrix per protocol
(:class:`wsiproto.metrics.ConfusionMatrix`, background last). The class probabilities and the
image labels are kept, so training can calibrate thresholds from the same pass
(:func:`calibrate_thresholds`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from wsiproto.errors import WsiprotoError
from wsiproto.metrics import ConfusionMatrix

PROTOCOLS = ("predicted", "oracle")


def mask_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Image-level labels ``float32 [C]`` of a mask: 1 where the class has at least one pixel."""
    counts = np.bincount(np.asarray(mask).ravel().clip(0, num_classes), minlength=num_classes + 1)
    return (counts[:num_classes] > 0).astype(np.float32)


def calibrate_thresholds(probs: np.ndarray, labels: np.ndarray, *,
                         default: float = 0.5) -> list[float]:
    """Per-class presence thresholds maximising F1 on ``probs [N, C]`` against ``labels [N, C]``.

    Candidates are the midpoints between consecutive distinct probabilities (and the extremes);
    ties go to the threshold nearest ``default``. A class with no positive or no negative image
    keeps ``default``: F1 cannot tell a good threshold there.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels) > 0
    out = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c], labels[:, c]
        if y.all() or not y.any():
            out.append(float(default))
            continue
        values = np.unique(p)
        candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2,
                                     [values[-1] + 1e-6]])
        best, best_f1 = float(default), -1.0
        for t in candidates:
            pred = p >= t
            tp = float((pred & y).sum())
            f1 = 2 * tp / max(float(pred.sum() + y.sum()), 1.0)
            nearer = abs(t - default) < abs(best - default)
            if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and nearer):
                best, best_f1 = float(t), f1
        out.append(round(min(max(best, 0.0), 1.0), 6))
    return out


@dataclass
class EvalResult:
    """Confusion matrices per protocol, with the per-image probabilities and labels behind them."""

    matrices: dict[str, ConfusionMatrix]
    probs: np.ndarray
    labels: np.ndarray
    names: list[str] = field(default_factory=list)

    def summary(self, protocol: str) -> dict:
        return self.matrices[protocol].summary(self.names)


def _to_tensor(images: Sequence[np.ndarray], mean, std, device, dtype):
    import torch

    x = torch.from_numpy(np.stack(images)).to(device)
    x = x.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    m = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def predict_pairs(model, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *,
                  protocols: Sequence[str] = PROTOCOLS, tta: bool = False, crf: bool = False,
                  thresholds: Sequence[float] | None = None, device=None, autocast: bool = False,
                  ) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]:
    """Predicted masks per protocol for ``(rgb uint8 [H, W, 3], mask or labels)`` pairs.

    The second element of a pair is a mask ``[H, W]`` (labels derived from it) or image-level
    labels ``[C]``. Returns ``({protocol: [mask int64 [H, W], ...]}, probs [N, C], labels [N, C])``.
    """
    import torch
    import torch.nn.functional as F

    from wsiproto.model.masks import class_maps, dense_crf, gate_maps, presence

    cfg = model.config
    c, tile = cfg.num_classes, int(cfg.tile_size)
    device = device if device is not None else next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    labels = np.stack([t if t.ndim == 1 else mask_labels(t, c) for _, t in pairs]).astype(np.float32)
    model_in = [rgb if rgb.shape[:2] == (tile, tile) else _resize_rgb(rgb, tile) for rgb, _ in pairs]
    x = _to_tensor(model_in, cfg.mean, cfg.std, device, dtype)
    with torch.inference_mode():
        if autocast:
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                maps, probs = class_maps(model, x, tta=tta)
        else:
            maps, probs = class_maps(model, x, tta=tta)
        maps, probs = maps.float(), probs.float()
        out: dict[str, list[np.ndarray]] = {p: [] for p in protocols}
        gates = {}
        for protocol in protocols:
            if protocol not in PROTOCOLS:
                raise WsiprotoError(f"unknown protocol {protocol!r}", hint="use predicted or oracle")
            lab = torch.from_numpy(labels).to(probs.device) if protocol == "oracle" else None
            gates[protocol] = presence(model, probs, lab, thresholds=thresholds)
        for i, (rgb, _) in enumerate(pairs):
            h, w = rgb.shape[:2]
            m = maps[i:i + 1]
            if (h, w) != tuple(m.shape[-2:]):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            for protocol in protocols:
                scores = gate_maps(m, gates[protocol][i:i + 1], cfg.mask_alpha)
                if crf:
                    scores = torch.from_numpy(dense_crf(rgb[None], scores.cpu().numpy()))
                out[protocol].append(scores[0].argmax(0).cpu().numpy().astype(np.int64))
    return out, probs.cpu().numpy(), labels


def _batches(dataset, batch_size: int, workers: int) -> Iterable[list]:
    """Items of ``dataset`` (decoded in ``workers`` processes) in lists of ``batch_size``."""
    if workers <= 0:
        batch = []
        for i in range(len(dataset)):
            batch.append(dataset[i])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=list)
    yield from loader


def evaluate_dataset(model, dataset, *, protocols: Sequence[str] = PROTOCOLS, tta: bool = False,
                     crf: bool = False, thresholds: Sequence[float] | None = None,
                     batch_size: int = 16, workers: int = 0, device=None, autocast: bool = False,
                     progress: Callable[[int], None] | None = None) -> EvalResult:
    """Confusion matrices of ``model`` on a masked split (items ``(rgb, mask)``, no transform)."""
    if getattr(dataset, "transform", None) is not None:
        raise ValueError("evaluate_dataset needs a dataset without a transform")
    c = model.config.num_classes
    if dataset.num_classes != c:
        raise WsiprotoError(f"the dataset has {dataset.num_classes} classes "
                            f"({', '.join(dataset.table.names)}) but the model {c} "
                            f"({', '.join(model.config.classes.names)})",
                            path=getattr(dataset, "root", None),
                            hint="evaluate a model trained on this dataset's class table")
    matrices = {p: ConfusionMatrix(c) for p in protocols}
    all_probs, all_labels = [], []
    for batch in _batches(dataset, batch_size, workers):
        masks, probs, labels = predict_pairs(model, batch, protocols=protocols, tta=tta, crf=crf,
                                             thresholds=thresholds, device=device,
                                             autocast=autocast)
        for protocol in protocols:
            for (_, truth), pred in zip(batch, masks[protocol]):
                matrices[protocol].update(truth, pred)
        all_probs.append(probs)
        all_labels.append(labels)
        if progress is not None:
            progress(len(batch))
    return EvalResult(matrices, np.concatenate(all_probs), np.concatenate(all_labels),
                      names=list(model.config.classes.names) + [model.config.classes.background_name])


def trivial_baselines(dataset, train_labels: np.ndarray) -> dict[str, ConfusionMatrix]:
    """Confusion matrices of two model-free predictions on a masked split, for comparison:

    * ``majority`` (what any model must beat in the predicted protocol): every pixel is the
      class carried by the most training images;
    * ``oracle_fill`` (the same for the oracle protocol): every pixel is the image's own
      ground-truth class that is most common in training (background when it has none).
    """
    c = dataset.num_classes
    frequency = np.asarray(train_labels, np.float64).sum(0)
    majority = int(frequency.argmax())
    rank = np.argsort(-frequency, kind="stable")
    out = {"majority": ConfusionMatrix(c), "oracle_fill": ConfusionMatrix(c)}
    for i in range(len(dataset)):
        _, mask = dataset[i]
        out["majority"].update(mask, np.full_like(mask, majority))
        present = mask_labels(mask, c)
        fill = next((int(k) for k in rank if present[k] > 0), c)
        out["oracle_fill"].update(mask, np.full_like(mask, fill))
    return out


def format_table(rows: dict[str, dict], names: Sequence[str]) -> str:
    """A Markdown table: one row per result (``summary()`` dicts), per-class IoU, mIoU, mDice."""
    head = "| | " + " | ".join(names) + " | mIoU | mDice | FwIoU |"
    lines = [head, "|" + "---|" * (len(names) + 4)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    for label, s in rows.items():
        cells = [pct(s["IoU"].get(n)) for n in names] + [pct(s["mIoU"]), pct(s["mDice"]),
                                                           pct(s["FwIoU"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
