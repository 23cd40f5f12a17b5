"""From CAMs to label masks.

For each image: CAMs of the finest level -> ReLU -> per-class min-max to [0, 1] -> gated by class
presence -> background score ``(1 - max_c cam_c) ** alpha`` -> argmax over ``C + 1`` channels,
value ``C`` being background.

Presence gating has two protocols:

* ``oracle`` (``labels`` given): the image-level labels, as in the published BCSS numbers;
* ``predicted`` (no labels): a class is present when the model's probability reaches that class's
  calibrated threshold (``config.thresholds``, 0.5 until training calibrates them). The
  probability is the mean over pyramid levels of ``sigmoid(logit)`` with the inference
  (softmax-weighted) merge, which is steadier than any single level. A tile with no class above
  threshold keeps its most probable class (tiles reaching the model have passed tissue
  detection, so "no tissue class at all" is the less likely error); ``keep_top=False`` turns
  that off.

Test-time augmentation averages the ReLU'd finest CAMs (mapped back to the original orientation)
and the probabilities over flips (none, horizontal, vertical) times brightness factors (0.9, 1.0,
1.1 of the de-normalised image), before min-max and gating.

The optional dense CRF uses ``pydensecrf2`` (the maintained fork of Krähenbühl's fully connected
CRF bindings, built from source by pip; install with ``pip install 'wsiproto[crf]'``), with
unaries from the normalised scores and the usual Gaussian (sxy 3, compat 3) plus bilateral
(sxy 50, srgb 13, compat 10) pairwise terms, 10 mean-field iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from wsiproto.errors import WsiprotoError

DEFAULT_FLIPS = ("none", "h", "v")
DEFAULT_BRIGHTNESS = (0.9, 1.0, 1.1)


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _flip(x: torch.Tensor, flip: str) -> torch.Tensor:
    if flip == "none":
        return x
    if flip == "h":
        return x.flip(-1)
    if flip == "v":
        return x.flip(-2)
    raise ValueError(f"unknown flip {flip!r}; use 'none', 'h' or 'v'")


def _stats(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    mean = torch.as_tensor(cfg.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(cfg.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return mean, std


def _brightness(model, images: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return images
    mean, std = _stats(model, images)
    pixels = (images * std + mean) * factor
    return (pixels.clamp(0, 1) - mean) / std


def _cams_and_probs(model, images, flips, brightness):
    """Averaged ReLU'd finest-level class CAMs at input size and mean-level probabilities."""
    cam_sum, prob_sum, n = None, None, 0
    for factor in brightness:
        bright = _brightness(model, images, float(factor))
        for flip in flips:
            out = model(_flip(bright, flip), cams=True, merge="softmax")
            cam = out.cams[-1].float().relu()
            if cam.shape[-2:] != images.shape[-2:]:
                cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
            cam = _flip(cam, flip)
            prob = torch.stack([lg.float().sigmoid() for lg in out.logits]).mean(0)
            cam_sum = cam if cam_sum is None else cam_sum + cam
            prob_sum = prob if prob_sum is None else prob_sum + prob
            n += 1
    return cam_sum / n, prob_sum / n


def presence(model, probs: torch.Tensor, labels: torch.Tensor | None = None, *,
             thresholds: Sequence[float] | None = None, keep_top: bool = True) -> torch.Tensor:
    """``[B, C]`` 0/1 gate: the labels (oracle) or thresholded probabilities (predicted)."""
    if labels is not None:
        labels = torch.as_tensor(labels, device=probs.device)
        if labels.shape != probs.shape:
            raise WsiprotoError(f"labels must be [B, C] = {tuple(probs.shape)}, got {tuple(labels.shape)}")
        return (labels > 0).to(probs.dtype)
    thr = torch.as_tensor(thresholds if thresholds is not None else model.config.thresholds,
                          dtype=probs.dtype, device=probs.device)
    gate = (probs >= thr).to(probs.dtype)
    if keep_top:
        top = F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        gate = torch.where(gate.sum(1, keepdim=True) > 0, gate, top)
    return gate


def class_maps(model, images: torch.Tensor, *, tta: bool = False,
               flips: Sequence[str] = DEFAULT_FLIPS,
               brightness: Sequence[float] = DEFAULT_BRIGHTNESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Ungated class maps ``[B, C, H, W]`` (finest CAMs, ReLU, per-class min-max to [0, 1]) and
    class probabilities ``[B, C]``: everything both protocols share, computed once."""
    with _eval_mode(model), torch.inference_mode():
        if not tta:
            flips, brightness = ("none",), (1.0,)
        cams, probs = _cams_and_probs(model, images, tuple(flips), tuple(brightness))
        lo = cams.amin(dim=(2, 3), keepdim=True)
        hi = cams.amax(dim=(2, 3), keepdim=True)
        return (cams - lo) / (hi - lo).clamp_min(1e-6), probs


def gate_maps(maps: torch.Tensor, gate: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scores ``[B, C + 1, H, W]`` from class maps and a ``[B, C]`` presence gate: gated classes,
    then background ``(1 - max_c) ** alpha``."""
    maps = maps * gate[:, :, None, None].to(maps.dtype)
    background = (1 - maps.amax(dim=1, keepdim=True)).clamp_min(0) ** alpha
    return torch.cat([maps, background], dim=1)


def mask_scores(model, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                tta: bool = False, alpha: float | None = None,
                thresholds: Sequence[float] | None = None, keep_top: bool = True,
                flips: Sequence[str] = DEFAULT_FLIPS,
                brightness: Sequence[float] = DEFAULT_BRIGHTNESS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel scores ``[B, C + 1, H, W]`` (background last, each in [0, 1]) and the class
    probabilities ``[B, C]``. ``predict_masks`` is their argmax; tiling code may blend them."""
    alpha = model.config.mask_alpha if alpha is None else float(alpha)
    maps, probs = class_maps(model, images, tta=tta, flips=flips, brightness=brightness)
    with torch.inference_mode():
        gate = presence(model, probs, labels, thresholds=thresholds, keep_top=keep_top)
        return gate_maps(maps, gate, alpha), probs


def predict_masks(model, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                  tta: bool = False, crf: bool = False, alpha: float | None = None,
                  thresholds: Sequence[float] | None = None, keep_top: bool = True) -> torch.Tensor:
    """Label masks ``int64 [B, H, W]`` for normalised images; value ``C`` is background.

    ``labels`` (``[B, C]`` 0/1) selects the oracle protocol, none the predicted one.
    """
    scores, _ = mask_scores(model, images, labels, tta=tta, alpha=alpha, thresholds=thresholds,
                            keep_top=keep_top)
    if crf:
        mean, std = _stats(model, images)
        pixels = ((images.detach().float() * std.float() + mean.float()).clamp(0, 1) * 255)
        rgb = pixels.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        refined = dense_crf(rgb, scores.cpu().numpy())
        return torch.from_numpy(refined.argmax(1)).to(device=images.device, dtype=torch.int64)
    return scores.argmax(dim=1).to(torch.int64)


def dense_crf(rgb: np.ndarray, scores: np.ndarray, *, iterations: int = 10,
              gaussian: tuple[float, float] = (3, 3),
              bilateral: tuple[float, float, float] = (50, 13, 10)) -> np.ndarray:
    """Refine ``scores [B, K, H, W]`` (non-negative) with a dense CRF on ``rgb uint8 [B, H, W, 3]``.

    Returns the CRF marginals ``[B, K, H, W]``. ``gaussian`` = (sxy, compat), ``bilateral`` =
    (sxy, srgb, compat).
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise WsiprotoError("dense CRF needs the optional package pydensecrf2",
                            hint="pip install 'wsiproto[crf]'") from None
    out = np.empty_like(scores, dtype=np.float32)
    batch, classes, height, width = scores.shape
    for i in range(batch):
        probs = scores[i].astype(np.float32) + 1e-5
        probs /= probs.sum(0, keepdims=True)
        crf = dcrf.DenseCRF2D(width, height, classes)
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
        crf.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
        crf.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1],
                                 rgbim=np.ascontiguousarray(rgb[i]), compat=bilateral[2])
        q = crf.inference(iterations)
        out[i] = np.asarray(q, dtype=np.float32).reshape(classes, height, width)
    return out
