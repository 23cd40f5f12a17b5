"""Patch transforms: random flips / 90-degree rotations, crop or resize to the tile size,
to-tensor with normalisation.

The geometric functions work on numpy arrays and apply the same operation to an image and its
mask. Torch is imported only inside :func:`to_tensor` / :func:`target_to_tensor`, so this module
(and the datasets holding a transform) stay cheap to pickle into DataLoader workers.

Randomness: a transform built with ``seed=None`` draws from numpy's global generator, which
PyTorch's DataLoader seeds differently in every worker; with a ``seed`` it owns a
``numpy.random.Generator`` (reproducible, but copied identically into each worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError

#: BCSS-WSSS training statistics (RGB, 0..1), the default normalisation.
BCSS_MEAN = (0.668, 0.478, 0.706)
BCSS_STD = (0.174, 0.226, 0.198)
TILE_SIZE = 224

Rng = Any  # numpy Generator, RandomState or the numpy.random module


def _randint(rng: Rng, high: int) -> int:
    """An integer in ``[0, high)`` from a Generator, a RandomState or ``numpy.random``."""
    if high <= 1:
        return 0
    if rng is None:
        rng = np.random
    return int(rng.integers(high) if hasattr(rng, "integers") else rng.randint(high))


def flip_rotate(image: np.ndarray, mask: np.ndarray | None, k: int, flip: bool):
    """Rotate by ``k`` x 90 degrees after an optional left-right flip, image and mask alike."""
    def op(a):
        if a is None:
            return None
        if flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(np.rot90(a, k, axes=(0, 1)))
    return op(image), op(mask)


def random_flip_rotate(image: np.ndarray, mask: np.ndarray | None = None, rng: Rng = None):
    """One of the 8 dihedral transforms (flips and 90-degree rotations), uniformly at random."""
    k = _randint(rng, 4)
    flip = bool(_randint(rng, 2))
    return flip_rotate(image, mask, k, flip)


def _resize(image: np.ndarray, mask: np.ndarray | None, width: int, height: int):
    from PIL import Image

    out = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    if mask is None:
        return out, None
    if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
        raise WsiprotoError(f"mask values must lie in 0..255 to resize, got {mask.min()}..{mask.max()}")
    m = Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.NEAREST)
    return out, np.asarray(m).astype(mask.dtype)


def resize_to(image: np.ndarray, mask: np.ndarray | None = None, size: int = TILE_SIZE):
    """Resize to ``size x size`` (bilinear image, nearest-neighbour mask)."""
    if image.shape[:2] == (size, size):
        return image, mask
    return _resize(image, mask, size, size)


def _at_least(image: np.ndarray, mask: np.ndarray | None, size: int):
    """Scale up (aspect kept) so that the shorter side is at least ``size``."""
    h, w = image.shape[:2]
    if min(h, w) >= size:
        return image, mask
    scale = size / min(h, w)
    return _resize(image, mask, max(size, round(w * scale)), max(size, round(h * scale)))


def random_crop(image: np.ndarray, mask: np.ndarray | None = None, size: int = TILE_SIZE,
                rng: Rng = None):
    """A random ``size x size`` window. A side shorter than ``size`` is first scaled up (aspect
    kept) so that the shorter side is ``size``; an image of exactly that size is returned as is."""
    image, mask = _at_least(image, mask, size)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image, mask
    y, x = _randint(rng, h - size + 1), _randint(rng, w - size + 1)
    crop = (slice(y, y + size), slice(x, x + size))
    return image[crop], (None if mask is None else mask[crop])


def center_crop(image: np.ndarray, mask: np.ndarray | None = None, size: int = TILE_SIZE):
    """The central ``size x size`` window (scaling up a shorter side first, like random_crop)."""
    image, mask = _at_least(image, mask, size)
    h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    crop = (slice(y, y + size), slice(x, x + size))
    return image[crop], (None if mask is None else mask[crop])


def to_tensor(image: np.ndarray, mean: Sequence[float] = BCSS_MEAN,
              std: Sequence[float] = BCSS_STD):
    """``uint8 [H, W, 3]`` -> normalised ``float32`` torch tensor ``[3, H, W]``."""
    import torch

    if image.ndim != 3 or image.shape[2] != 3:
        raise WsiprotoError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)


def denormalise(tensor, mean: Sequence[float] = BCSS_MEAN, std: Sequence[float] = BCSS_STD) -> np.ndarray:
    """Inverse of :func:`to_tensor`: ``[3, H, W]`` tensor -> ``uint8 [H, W, 3]``."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    t = (tensor.detach().float().cpu() * s + m).clamp(0, 1).mul(255).round()
    return t.permute(1, 2, 0).to(torch.uint8).numpy()


def target_to_tensor(target: np.ndarray):
    """Labels ``[C]`` -> float32 tensor; a mask ``[H, W]`` -> int64 tensor."""
    import torch

    target = np.ascontiguousarray(target)
    if target.ndim == 2:
        return torch.from_numpy(target.astype(np.int64, copy=False))
    return torch.from_numpy(target.astype(np.float32, copy=False))


class TrainTransform:
    """Training augmentation: crop (or resize) to ``size``, random flip + 90-degree rotation,
    to-tensor + normalisation. Called as ``transform(rgb, target)``; a 2-D target is a mask and
    gets the same geometric operations, a 1-D target (image-level labels) passes through.
    Returns ``(image float32 [3, size, size], target tensor)``."""

    def __init__(self, size: int | None = TILE_SIZE, mean: Sequence[float] = BCSS_MEAN,
                 std: Sequence[float] = BCSS_STD, *, resize: str = "crop", flip_rotate: bool = True,
                 seed: int | None = None):
        if resize not in ("crop", "resize"):
            raise WsiprotoError(f"resize must be 'crop' or 'resize', got {resize!r}")
        _check_stats(mean, std)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.resize, self.flip_rotate, self.seed = resize, flip_rotate, seed
        self._rng = None if seed is None else np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, target: np.ndarray):
        mask = target if target.ndim == 2 else None
        rng = self._rng if self._rng is not None else np.random
        if self.size is not None:
            if self.resize == "resize":
                image, mask = resize_to(image, mask, self.size)
            else:
                image, mask = random_crop(image, mask, self.size, rng)
        if self.flip_rotate:
            image, mask = random_flip_rotate(image, mask, rng)
        out_target = mask if mask is not None else target
        return to_tensor(image, self.mean, self.std), target_to_tensor(out_target)

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}, resize={self.resize!r}, "
                f"flip_rotate={self.flip_rotate}, mean={self.mean}, std={self.std})")


class EvalTransform:
    """Evaluation: no geometry change unless ``size`` is given (then resize, nearest for masks),
    to-tensor + normalisation. Returns ``(image float32 [3, H, W], target tensor)``."""

    def __init__(self, mean: Sequence[float] = BCSS_MEAN, std: Sequence[float] = BCSS_STD,
                 size: int | None = None):
        _check_stats(mean, std)
        self.mean, self.std, self.size = tuple(mean), tuple(std), size

    def __call__(self, image: np.ndarray, target: np.ndarray):
        if self.size is not None:
            mask = target if target.ndim == 2 else None
            image, mask = resize_to(image, mask, self.size)
            if mask is not None:
                target = mask
        return to_tensor(image, self.mean, self.std), target_to_tensor(target)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std})"


def _check_stats(mean, std) -> None:
    if len(tuple(mean)) != 3 or len(tuple(std)) != 3:
        raise WsiprotoError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
    if any(float(s) <= 0 for s in std):
        raise WsiprotoError(f"std values must be positive, got {tuple(std)}")
