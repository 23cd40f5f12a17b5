"""Metrics against hand-computed confusion matrices."""

from __future__ import annotations

import numpy as np
import pytest

from wsiproto.metrics import ConfusionMatrix


def test_hand_computed_two_classes_plus_background():
    # truth / prediction over 10 pixels, classes 0, 1 and background 2
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    cm = ConfusionMatrix(2)
    cm.update(truth, pred)
    # rows truth, cols prediction
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    # class 0: TP 3, FP 1 (from bg), FN 1 -> IoU 3/5, Dice 6/8
    # class 1: TP 2, FP 1, FN 1 -> IoU 2/4, Dice 4/6
    # background: TP 2, FP 1, FN 1 -> IoU 2/4
    np.testing.assert_allclose(cm.iou(), [0.6, 0.5, 0.5])
    np.testing.assert_allclose(cm.dice(), [0.75, 4 / 6, 4 / 6])
    s = cm.summary(["TUM", "STR"])
    assert s["mIoU"] == pytest.approx((0.6 + 0.5) / 2)
    assert s["mDice"] == pytest.approx((0.75 + 4 / 6) / 2, abs=1e-6)
    # FwIoU: freq 0.4, 0.3, 0.3 over all rows
    assert s["FwIoU"] == pytest.approx(0.4 * 0.6 + 0.3 * 0.5 + 0.3 * 0.5)
    assert s["pixel_accuracy"] == pytest.approx(0.7)
    assert s["IoU"] == {"TUM": 0.6, "STR": 0.5, "background": 0.5}


def test_absent_class_is_skipped_not_zero_and_ignore_index():
    cm = ConfusionMatrix(3)
    truth = np.array([[0, 0], [3, 255]])
    pred = np.array([[0, 0], [3, 1]])
    cm.update(truth, pred)  # the 255 pixel is ignored
    iou = cm.iou()
    assert iou[0] == 1.0 and iou[3] == 1.0
    assert np.isnan(iou[1]) and np.isnan(iou[2])
    s = cm.summary(["a", "b", "c"])
    assert s["mIoU"] == 1.0 and s["IoU"]["b"] is None


def test_accumulates_and_merges_and_checks():
    a, b = ConfusionMatrix(1), ConfusionMatrix(1)
    a.update(np.array([0, 1]), np.array([0, 0]))
    b.update(np.array([1]), np.array([1]))
    a.merge(b)
    assert a.matrix.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="shapes"):
        a.update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="0..1"):
        a.update(np.array([2]), np.array([0]))
