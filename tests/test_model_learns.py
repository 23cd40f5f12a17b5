"""DualProtoSeg learns from image-level labels alone (tiny preset, CPU, generated data).

The toy set: 224 px images of light "glass" with one to three rectangles of three textures
(reddish horizontal stripes, greenish checkerboard, bluish speckle) at random places and sizes;
training sees only which textures are present. After 150 AdamW steps at batch 8 (about a minute
on two CPU cores; observed: AUC 0.80, oracle mIoU 0.39 against a trivial 0.17) it asserts:

* classification on held-out images: macro ROC-AUC of the inference-mode class probabilities
  >= 0.70, chance being 0.5 (AUC, not accuracy at 0.5: the softmax-weighted inference merge
  shifts logits upward, and calibrating per-class thresholds is the training loop's job);
* masks (oracle protocol: presence from the true labels, as in the published numbers): mIoU over
  the three texture classes >= 0.30 and at least 0.12 above the best trivial baseline, which is
  the better of "one class everywhere" and "fill each image with one of its true classes"
  (0.17 here).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from texture_sets import texture  # noqa: E402

from wsiproto.classes import ClassInfo, ClassTable  # noqa: E402
from wsiproto.model import create_model, predict_masks  # noqa: E402

SIZE = 224
GLASS = np.array([236, 232, 238], np.float32)
TOY_CLASSES = ClassTable("toy", (
    ClassInfo("stripes", (200, 40, 40), ("red horizontal stripes", "striped red texture")),
    ClassInfo("checker", (40, 160, 40), ("green checkerboard", "checkered green texture")),
    ClassInfo("speckle", (40, 40, 200), ("blue speckles", "speckled blue texture")),
))


def make_toy_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images uint8 [n, H, W, 3], labels [n, 3] (0/1) and masks [n, H, W] (3 = glass)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.full((n, SIZE, SIZE), 3, np.int64)
    labels = np.zeros((n, 3), np.float32)
    for i in range(n):
        img = GLASS + rng.normal(0, 6, size=(SIZE, SIZE, 3))
        kinds = rng.permutation(3)[: rng.integers(1, 4)]
        for kind in kinds:
            h, w = rng.integers(64, 150, size=2)
            y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
            img[y:y + h, x:x + w] = texture(int(kind), h, w, rng)
            masks[i, y:y + h, x:x + w] = kind
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        for k in range(3):
            labels[i, k] = float((masks[i] == k).sum() >= 256)  # a sliver is not a label
    return images, labels, masks


def _normalise(model, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    return (x - mean) / std


def miou(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    ious = []
    for k in range(classes):
        inter = np.logical_and(pred == k, truth == k).sum()
        union = np.logical_or(pred == k, truth == k).sum()
        ious.append(inter / union if union else 1.0)
    return float(np.mean(ious))


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the probability that a positive outranks a negative (ties half)."""
    aucs = []
    for k in range(labels.shape[1]):
        pos, neg = probs[labels[:, k] > 0, k], probs[labels[:, k] == 0, k]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            aucs.append(float((diff > 0).mean() + 0.5 * (diff == 0).mean()))
    return float(np.mean(aucs))


def trivial_miou(labels: np.ndarray, truth: np.ndarray, classes: int) -> float:
    constant = max(miou(np.full_like(truth, k), truth, classes) for k in range(classes))
    fill = np.stack([np.full(truth.shape[1:], int(np.argmax(lab))) for lab in labels])
    return max(constant, miou(fill, truth, classes))


@pytest.mark.timeout(300)
def test_learns_classification_and_masks_from_image_labels():
    torch.manual_seed(0)
    start = time.perf_counter()
    train_x, train_y, _ = make_toy_set(192, seed=1)
    test_x, test_y, test_m = make_toy_set(48, seed=2)
    model = create_model("dualproto-tiny", classes=TOY_CLASSES, seed=0, n_ctx=4)
    xs, ys = _normalise(model, train_x), torch.from_numpy(train_y)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-3)
    steps, batch = 150, 8
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xs), (batch,), generator=gen)
        x = xs[idx]
        if step % 2:  # flips, as in the reference training
            x = x.flip(-1)
        out = model(x, cams=False)
        loss, _ = model.loss(out, ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - start

    model.eval()
    x = _normalise(model, test_x)
    with torch.inference_mode():
        probs = torch.stack([lg.sigmoid() for lg in model(x, cams=False).logits]).mean(0).numpy()
    auc = macro_auc(probs, test_y)
    accuracy = float(((probs >= 0.5) == (test_y > 0)).mean())
    masks = predict_masks(model, x, torch.from_numpy(test_y)).numpy()
    score = miou(masks, test_m, 3)
    baseline = trivial_miou(test_y, test_m, 3)
    predicted = miou(predict_masks(model, x).numpy(), test_m, 3)
    print(f"\ntrain {train_s:.0f}s; AUC {auc:.3f} (accuracy at 0.5: {accuracy:.3f}); mIoU oracle "
          f"{score:.3f}, predicted {predicted:.3f} (trivial {baseline:.3f})")
    assert auc >= 0.70, f"macro AUC {auc:.3f} (chance 0.5)"
    assert score >= 0.30 and score >= baseline + 0.12, \
        f"oracle mIoU {score:.3f}, best trivial baseline {baseline:.3f}"
