"""Segmentation metrics from one confusion matrix (tissue classes + background).

``ConfusionMatrix(num_classes)`` accumulates a ``(C + 1) x (C + 1)`` matrix of pixel counts,
rows = ground truth, columns = prediction, index ``C`` = background (BCSS-WSSS masks use 4 for
background/exclude with 4 tissue classes). From it:

* ``IoU[c] = TP / (TP + FP + FN)`` and ``Dice[c] = 2 TP / (2 TP + FP + FN)`` per class;
* ``mIoU`` and ``mDice``: means over the *tissue* classes (background excluded, as in the
  published BCSS-WSSS numbers), skipping a class that appears in neither ground truth nor
  prediction (its IoU is undefined, not 0);
* ``FwIoU``: frequency-weighted IoU over every row of the matrix, background included (the FCN
  scoring convention used by the WSSS reference code): ``sum_c freq[c] * IoU[c]`` with
  ``freq[c] = row_c / total``;
* ``pixel_accuracy``: trace / total.

Pixels whose ground truth is ``ignore_index`` (e.g. 255) are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ConfusionMatrix:
    def __init__(self, num_classes: int, *, ignore_index: int | None = 255):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)

    @property
    def size(self) -> int:
        return self.num_classes + 1

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Add the pixels of one mask pair (integer arrays of the same shape, values 0..C)."""
        truth = np.asarray(truth)
        prediction = np.asarray(prediction)
        if truth.shape != prediction.shape:
            raise ValueError(f"mask shapes differ: truth {truth.shape}, prediction {prediction.shape}")
        t = truth.ravel().astype(np.int64)
        p = prediction.ravel().astype(np.int64)
        keep = np.ones(t.shape, bool) if self.ignore_index is None else t != self.ignore_index
        t, p = t[keep], p[keep]
        n = self.size
        if t.size and (t.min() < 0 or t.max() >= n or p.min() < 0 or p.max() >= n):
            raise ValueError(f"mask values must lie in 0..{n - 1} (background = {n - 1})")
        self.matrix += np.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.size != self.size:
            raise ValueError("confusion matrices of different sizes")
        self.matrix += other.matrix
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU over all C + 1 rows (NaN where the class is in neither mask)."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        denom = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def dice(self) -> np.ndarray:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        denom = m.sum(0) + m.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def fw_iou(self) -> float:
        m = self.matrix.astype(np.float64)
        total = m.sum()
        if total == 0:
            return float("nan")
        freq = m.sum(1) / total
        iou = np.nan_to_num(self.iou(), nan=0.0)
        return float((freq * iou).sum())

    def summary(self, names: Sequence[str] | None = None) -> dict:
        """``{"mIoU", "mDice", "FwIoU", "pixel_accuracy", "IoU": {name: ...}, "Dice": {...},
        "confusion_matrix": [[...]]}``; per-class values of the tissue classes and background."""
        c = self.num_classes
        names = list(names) if names is not None else [f"class_{i}" for i in range(c)]
        if len(names) == c:
            names = names + ["background"]
        if len(names) != c + 1:
            raise ValueError(f"{len(names)} names for {c} classes + background")
        iou, dice = self.iou(), self.dice()
        tissue_iou, tissue_dice = iou[:c], dice[:c]
        total = self.matrix.sum()

        def mean(values: np.ndarray) -> float:
            ok = ~np.isnan(values)
            return float(values[ok].mean()) if ok.any() else float("nan")

        def clean(v: float) -> float | None:
            return None if np.isnan(v) else round(float(v), 6)

        return {
            "mIoU": clean(mean(tissue_iou)),
            "mDice": clean(mean(tissue_dice)),
            "FwIoU": clean(self.fw_iou()),
            "pixel_accuracy": clean(np.trace(self.matrix) / total if total else float("nan")),
            "IoU": {n: clean(v) for n, v in zip(names, iou)},
            "Dice": {n: clean(v) for n, v in zip(names, dice)},
            "confusion_matrix": self.matrix.tolist(),
        }
