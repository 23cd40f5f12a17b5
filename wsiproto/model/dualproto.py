"""DualProtoSeg: a dual (text + image) prototype bank matched against a multi-scale feature pyramid.

Data flow for images ``[B, 3, S, S]`` (``S`` = the tower's input size, 224 for the presets):

1. The backbone (any registered family) gives the outputs of four ViT blocks as
   ``[B, width, S/p, S/p]`` grids (``p`` its patch size: 14x14 tokens for ViT-B/16 at 224 px).
2. One shared refiner (1x1 conv to ``refiner_dim`` -> ``refiner_blocks`` residual 3x3 blocks ->
   L2 norm) turns each into a ``refiner_dim`` feature map.
3. Pyramid level ``l`` (coarse to fine: strides 8, 4, 2, 1, i.e. 28, 56, 112, 224 px with 256,
   128, 64, 32 channels at 224 input) has its own small head (1x1 conv -> GroupNorm -> ReLU ->
   3x3 conv) applied at the token grid, bilinearly resized to its size, L2-normalised per pixel.
4. The bank (per class: its text prototypes then its image prototypes, contiguous) is projected
   per level by a bias-free ``Linear(proto_dim, C_l)`` + L2 norm; the prototype CAM is
   ``scale_l * cos(pixel, prototype)`` with a learnable ``scale_l`` (init 1/0.07); its global
   average is the prototype logit.
5. Prototypes merge into classes by their mean in training and by a softmax-weighted max
   (``sum_k softmax(l)_k * l_k`` over the class's prototypes) at inference; class CAMs use the
   same weights, so a class logit is always the global average of its class CAM.

Choices where the paper and reference code are silent (stated so they can be revisited):

* Block-to-level order: the deepest block feeds the coarsest level and the shallowest block the
  finest, as in hierarchical backbones (less smoothed, more local features at high resolution).
* Heads work at the token grid and are resized afterwards (the method's "conv head, then resize");
  a 3x3 conv on an upsampled map would add cost but no information.
* Pyramid off = a single level at the finest size and channels fed by the *last* block: the
  plain-ViT baseline that the pyramid is meant to beat.
* Normalisation layers are GroupNorm, not BatchNorm: training batches of pathology tiles are
  small and often single-class, and inference must not depend on batch composition.
* Class CAMs are merged from prototype CAMs by linearity (the merged class vector is dotted with
  the pixel features), which never materialises ``[B, P, S, S]``.
* Optional loss terms (off by default): alignment ``1 - cos(mean text, mean image prototype)`` per
  class; diversity = mean squared cosine between distinct prototypes of a class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiproto.classes import ClassTable, get_class_table
from wsiproto.errors import WsiprotoError
from wsiproto.model.backbone import Backbone, BackboneConfig
from wsiproto.model.prompts import PromptLearner

BCSS_MEAN = (0.668, 0.478, 0.706)
BCSS_STD = (0.174, 0.226, 0.198)
PROTOTYPE_MODES = ("dual", "text", "image")


@dataclass
class DualProtoConfig:
    """Everything needed to rebuild a model and use it on tiles (no file paths, no weights).

    Groups in the JSON form: ``backbone``, ``classes``, ``model`` (head and prototype switches),
    ``data`` (tile size, mpp, normalisation), ``masks`` (alpha, per-class thresholds).
    """

    classes: ClassTable
    backbone: BackboneConfig
    preset: str = "custom"
    # prototypes and prompts
    prototypes: str = "dual"
    n_ctx: int = 16
    ctx_init: str = "a histopathology image of"
    ctx_noise_std: float = 0.01
    descriptions_per_class: int | None = None
    image_prototypes_per_class: int | None = None
    proto_dim: int = 512
    # refiner and pyramid
    pyramid: bool = True
    refiner_dim: int = 512
    refiner_blocks: int = 2
    level_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])
    level_strides: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    logit_scale_init: float = 1 / 0.07
    # loss
    level_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    align_weight: float = 0.0
    diversity_weight: float = 0.0
    # data
    tile_size: int = 224
    mpp: float = 0.5
    mean: list[float] = field(default_factory=lambda: list(BCSS_MEAN))
    std: list[float] = field(default_factory=lambda: list(BCSS_STD))
    # masks
    mask_alpha: float = 10.0
    thresholds: list[float] | None = None

    _MODEL_KEYS = ("prototypes", "n_ctx", "ctx_init", "ctx_noise_std", "descriptions_per_class",
                   "image_prototypes_per_class", "proto_dim", "pyramid", "refiner_dim",
                   "refiner_blocks", "level_channels", "level_strides", "logit_scale_init",
                   "level_weights", "align_weight", "diversity_weight")
    _DATA_KEYS = ("tile_size", "mpp", "mean", "std")

    def __post_init__(self):
        self.classes = get_class_table(self.classes)
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if self.prototypes not in PROTOTYPE_MODES:
            raise WsiprotoError(f"prototypes must be one of {PROTOTYPE_MODES}, got {self.prototypes!r}")
        if not (len(self.level_channels) == len(self.level_strides) == len(self.level_weights) == 4):
            raise WsiprotoError("level_channels, level_strides and level_weights need 4 entries each")
        if self.n_ctx < 1 or self.refiner_blocks < 0 or self.proto_dim < 1:
            raise WsiprotoError("n_ctx and proto_dim must be >= 1, refiner_blocks >= 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise WsiprotoError("mean and std need three values each, std > 0")
        if self.mpp <= 0:
            raise WsiprotoError(f"mpp must be positive, got {self.mpp}")
        if self.thresholds is None:
            self.thresholds = [0.5] * self.num_classes
        self.thresholds = [float(t) for t in self.thresholds]
        if len(self.thresholds) != self.num_classes:
            raise WsiprotoError(
                f"masks.thresholds holds {len(self.thresholds)} values for {self.num_classes} "
                "classes", hint="give one presence threshold per class, or null for 0.5 each")
        if self.image_prototypes_per_class is not None and self.image_prototypes_per_class < 1:
            raise WsiprotoError("image_prototypes_per_class must be >= 1")
        self.classes.descriptions(self.descriptions_per_class)  # validates the count

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    def descriptions(self) -> list[list[str]]:
        return self.classes.descriptions(self.descriptions_per_class)

    def image_prototype_counts(self) -> list[int]:
        if self.image_prototypes_per_class is not None:
            return [self.image_prototypes_per_class] * self.num_classes
        return [len(d) for d in self.descriptions()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "backbone": self.backbone.to_dict(),
            "classes": self.classes.to_dict(),
            "model": {k: getattr(self, k) for k in self._MODEL_KEYS},
            "data": {k: getattr(self, k) for k in self._DATA_KEYS},
            "masks": {"alpha": self.mask_alpha, "thresholds": list(self.thresholds)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualProtoConfig:
        try:
            model, dat, masks = data.get("model", {}), data.get("data", {}), data.get("masks", {})
            unknown = (set(model) - set(cls._MODEL_KEYS)) | (set(dat) - set(cls._DATA_KEYS)) \
                | (set(masks) - {"alpha", "thresholds"})
            if unknown:
                raise WsiprotoError(f"unknown model settings {sorted(unknown)}")
            return cls(classes=ClassTable.from_dict(data["classes"]),
                       backbone=BackboneConfig.from_dict(data["backbone"]),
                       preset=data.get("preset", "custom"), **model, **dat,
                       mask_alpha=masks.get("alpha", 10.0), thresholds=masks.get("thresholds"))
        except (KeyError, TypeError, AttributeError) as err:
            raise WsiprotoError(f"invalid model config ({type(err).__name__}: {err})") from None


@dataclass
class DualProtoOutput:
    """What the model returns; lists run coarse to fine (one entry when the pyramid is off).

    ``logits``: ``[B, C]`` class logits per level; ``cams``: ``[B, C, h, w]`` class CAMs per level
    (empty when called with ``cams=False``); ``prototype_logits``: ``[B, P]`` per level; ``bank``:
    the ``[P, proto_dim]`` L2-normalised prototype bank used.
    """

    logits: list[torch.Tensor]
    cams: list[torch.Tensor]
    prototype_logits: list[torch.Tensor]
    bank: torch.Tensor


def _groups(channels: int) -> int:
    groups = min(32, max(1, channels // 8))
    while channels % groups:
        groups -= 1
    return groups


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv3x3(relu(gn(conv3x3(relu(gn(x))))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(dim), dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1),
            nn.GroupNorm(_groups(dim), dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FeatureRefiner(nn.Module):
    """Shared across levels: 1x1 conv -> residual 3x3 blocks -> L2 norm over channels."""

    def __init__(self, in_dim: int, dim: int, blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.Sequential(*(ResidualBlock(dim) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.blocks(self.inp(x)), dim=1)


class PyramidLevel(nn.Module):
    """One level: feature head, prototype projection and CAM scale."""

    def __init__(self, in_dim: int, channels: int, stride: int, proto_dim: int, scale_init: float):
        super().__init__()
        self.stride = stride
        self.head = nn.Sequential(
            nn.Conv2d(in_dim, channels, 1), nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1))
        # no bias: a shared offset would pull all prototypes of the level together
        self.proto_proj = nn.Linear(proto_dim, channels, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init)))

    def features(self, refined: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # channels-last makes the full-resolution resize and per-pixel norm several times faster
        x = self.head(refined).contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=(size[0] // self.stride, size[1] // self.stride),
                          mode="bilinear", align_corners=False)
        return F.normalize(x, dim=1)

    def prototypes(self, bank: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proto_proj(bank), dim=-1)


class DualProtoSeg(nn.Module):
    """The DualProtoSeg network. Build it with :func:`wsiproto.model.create_model`."""

    def __init__(self, config: DualProtoConfig, backbone: Backbone):
        super().__init__()
        self.config = config
        self.backbone = backbone
        num_classes = config.num_classes
        text_counts = [len(d) for d in config.descriptions()] if config.prototypes != "image" else \
            [0] * num_classes
        image_counts = config.image_prototype_counts() if config.prototypes != "text" else \
            [0] * num_classes

        self.prompts = None
        if config.prototypes != "image":
            self.prompts = PromptLearner(
                backbone, config.descriptions(), n_ctx=config.n_ctx, ctx_init=config.ctx_init,
                noise_std=config.ctx_noise_std, proto_dim=config.proto_dim)
        self.image_prototypes = None
        if config.prototypes != "text":
            self.image_prototypes = nn.Parameter(torch.randn(sum(image_counts), config.proto_dim) * 0.02)

        # Bank order: per class its text prototypes, then its image prototypes.
        order, owner, kind = [], [], []
        text_start, image_start = 0, sum(text_counts)
        for c in range(num_classes):
            order += range(text_start, text_start + text_counts[c])
            order += range(image_start, image_start + image_counts[c])
            owner += [c] * (text_counts[c] + image_counts[c])
            kind += [0] * text_counts[c] + [1] * image_counts[c]
            text_start += text_counts[c]
            image_start += image_counts[c]
        self.register_buffer("bank_order", torch.as_tensor(order, dtype=torch.long), persistent=False)
        self.register_buffer("prototype_class", torch.as_tensor(owner, dtype=torch.long),
                             persistent=False)
        self.register_buffer("prototype_kind", torch.as_tensor(kind, dtype=torch.long),
                             persistent=False)
        membership = F.one_hot(self.prototype_class, num_classes).T.float()  # [C, P]
        self.register_buffer("membership", membership, persistent=False)

        self.refiner = FeatureRefiner(backbone.vision_width, config.refiner_dim, config.refiner_blocks)
        levels = list(zip(config.level_channels, config.level_strides))
        if not config.pyramid:
            levels = levels[-1:]
        self.levels = nn.ModuleList(
            PyramidLevel(config.refiner_dim, c, s, config.proto_dim, config.logit_scale_init)
            for c, s in levels)

    # --- introspection -----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_prototypes(self) -> int:
        return int(self.prototype_class.numel())

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    # --- building blocks ---------------------------------------------------------------------
    def bank(self) -> torch.Tensor:
        """The L2-normalised prototype bank ``[P, proto_dim]``, contiguous per class."""
        parts = []
        if self.prompts is not None:
            parts.append(self.prompts())
        if self.image_prototypes is not None:
            parts.append(F.normalize(self.image_prototypes, dim=-1))
        bank = torch.cat([p.to(parts[0].dtype) for p in parts]) if len(parts) > 1 else parts[0]
        return bank[self.bank_order]

    def _check_input(self, images: torch.Tensor) -> None:
        size = self.backbone.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
                or tuple(images.shape[2:]) != size or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            dtype = getattr(images, "dtype", None)
            raise WsiprotoError(
                f"expected normalised float images [B, 3, {size[0]}, {size[1]}], got {got} {dtype}",
                hint=f"resize tiles to {size[0]} px and normalise with the model's mean/std")

    def _merge_weights(self, proto_logits: torch.Tensor, merge: str) -> torch.Tensor:
        """``[B, C, P]`` weights that turn prototype scores into class scores."""
        if merge == "mean":
            w = self.membership / self.membership.sum(1, keepdim=True)
            return w.to(proto_logits.dtype).expand(proto_logits.shape[0], -1, -1)
        if merge == "softmax":
            masked = proto_logits[:, None, :].masked_fill(self.membership[None] == 0, float("-inf"))
            return masked.softmax(dim=-1)
        raise ValueError(f"merge must be 'mean' or 'softmax', got {merge!r}")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *, cams: bool = True,
                merge: str | None = None) -> DualProtoOutput:
        """Class logits (and CAMs) at every level for normalised images ``[B, 3, S, S]``.

        ``merge`` defaults to ``"mean"`` in training mode and ``"softmax"`` in eval mode;
        ``cams=False`` skips the full-resolution CAMs (the loss needs only logits).
        """
        self._check_input(images)
        blocks = self.backbone.visual_features(images)
        return self.forward_blocks(blocks, tuple(images.shape[2:]), cams=cams, merge=merge)

    def forward_blocks(self, blocks: list[torch.Tensor], size: tuple[int, int], *,
                       cams: bool = True, merge: str | None = None) -> DualProtoOutput:
        """The head on precomputed backbone block outputs (``backbone.visual_features``: four
        ``[B, width, h, w]`` grids, shallow first) for input images of ``size``; what training
        from a feature cache runs."""
        merge = merge or ("mean" if self.training else "softmax")
        blocks = blocks[::-1] if self.config.pyramid else blocks[-1:]  # deep -> coarse level
        bank = self.bank()
        size = (int(size[0]), int(size[1]))
        out = DualProtoOutput([], [], [], bank)
        for level, block in zip(self.levels, blocks):
            feats = level.features(self.refiner(block.to(self.refiner.inp.weight.dtype)), size)
            protos = level.prototypes(bank).to(feats.dtype)  # [P, C_l]
            scale = level.logit_scale.to(feats.dtype)
            # GAP of the cosine map equals the cosine with the mean feature (linearity).
            proto_logits = scale * feats.mean(dim=(2, 3)) @ protos.T  # [B, P]
            weights = self._merge_weights(proto_logits, merge)  # [B, C, P]
            out.prototype_logits.append(proto_logits)
            out.logits.append((weights * proto_logits[:, None, :]).sum(-1))
            if cams:
                class_vectors = weights @ protos  # [B, C, C_l]
                out.cams.append(scale * torch.einsum("bchw,bkc->bkhw", feats, class_vectors))
        return out

    # --- loss --------------------------------------------------------------------------------
    def loss(self, output: DualProtoOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted multi-label BCE over levels plus the optional alignment/diversity terms.

        Returns the total and a dict of detached parts (``bce_0``.., ``align``, ``diversity``).
        """
        labels = labels.to(output.logits[-1].dtype)
        weights = self.config.level_weights[-len(output.logits):]
        parts: dict[str, torch.Tensor] = {}
        total = output.logits[-1].new_zeros(())
        for i, (w, logits) in enumerate(zip(weights, output.logits)):
            bce = F.binary_cross_entropy_with_logits(logits, labels)
            parts[f"bce_{i}"] = bce.detach()
            total = total + w * bce
        bank = output.bank
        if self.config.align_weight > 0 and self.config.prototypes == "dual":
            member_t = self.membership * (self.prototype_kind == 0)
            member_i = self.membership * (self.prototype_kind == 1)
            text_mean = F.normalize(member_t @ bank, dim=-1)
            image_mean = F.normalize(member_i @ bank, dim=-1)
            align = (1 - (text_mean * image_mean).sum(-1)).mean()
            parts["align"] = align.detach()
            total = total + self.config.align_weight * align
        if self.config.diversity_weight > 0:
            same = self.membership.T @ self.membership  # [P, P] 1 where same class
            same = same - torch.eye(same.shape[0], device=same.device)
            cos2 = (bank @ bank.T) ** 2
            diversity = (cos2 * same).sum() / same.sum().clamp_min(1)
            parts["diversity"] = diversity.detach()
            total = total + self.config.diversity_weight * diversity
        return total, parts
