"""Generated weakly labelled datasets for training tests: 224-px images of light glass with
rectangles of four textures standing in for TUM, STR, LYM, NEC, written in the BCSS-WSSS
layout (any of its folder variants) with exact palette masks for val/test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 224
GLASS = np.array([236, 232, 238], np.float32)
BCSS_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)]


def texture(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.integers(0, 8, size=2)
    if kind == 0:
        on = ((yy + phase[0]) // 4) % 2 == 0
        lo, hi = (200, 120, 130), (140, 40, 60)
    elif kind == 1:
        on = (((yy + phase[0]) // 6) + ((xx + phase[1]) // 6)) % 2 == 0
        lo, hi = (150, 200, 150), (60, 130, 70)
    elif kind == 2:
        on = rng.random((h, w)) < 0.35
        lo, hi = (170, 170, 220), (60, 60, 160)
    else:
        on = ((xx + phase[1]) // 5) % 2 == 0
        lo, hi = (230, 190, 120), (170, 120, 40)
    img = np.where(on[..., None], np.array(hi, np.float32), np.array(lo, np.float32))
    return img + rng.normal(0, 8, size=(h, w, 3))


def texture_image(rng: np.random.Generator, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One image uint8 [224, 224, 3] and its mask (``classes`` = background)."""
    img = GLASS + rng.normal(0, 6, size=(SIZE, SIZE, 3))
    mask = np.full((SIZE, SIZE), classes, np.int64)
    for kind in rng.permutation(classes)[: rng.integers(1, 3)]:
        h, w = rng.integers(80, 170, size=2)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        img[y:y + h, x:x + w] = texture(int(kind), h, w, rng)
        mask[y:y + h, x:x + w] = kind
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _palette_png(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([v for rgb in BCSS_PALETTE for v in rgb] + [0] * (768 - 3 * len(BCSS_PALETTE)))
    img.save(path)


def write_bcss_tree(root: Path, *, train: int = 24, val: int = 8, test: int = 8, seed: int = 0,
                    train_dir: str = "train", val_dir: str = "val") -> Path:
    """A BCSS-WSSS-format tree: ``train_dir`` (``train``, ``training`` or ``train/img``) with
    labels in the names, ``val_dir`` (``val`` or ``valid``) and ``test`` with palette masks."""
    rng = np.random.default_rng(seed)
    tdir = root / train_dir
    tdir.mkdir(parents=True, exist_ok=True)
    for i in range(train):
        img, mask = texture_image(rng)
        label = "".join("1" if (mask == c).sum() >= 256 else "0" for c in range(4))
        Image.fromarray(img).save(tdir / f"patch{i:03d}+0[{label}].png")
    for split, n in ((val_dir, val), ("test", test)):
        if n == 0:
            continue
        (root / split / "img").mkdir(parents=True, exist_ok=True)
        (root / split / "mask").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, mask = texture_image(rng)
            Image.fromarray(img).save(root / split / "img" / f"{split}{i:03d}.png")
            _palette_png(root / split / "mask" / f"{split}{i:03d}.png", mask)
    return root
