"""The vision-language backbone: an open_clip CLIP model seen as a multi-block feature extractor
plus a text tower that accepts prompt embeddings.

The module wraps an already built open_clip ``CLIP``; building it (names, configs, weight files)
is :mod:`wsiproto.model.factory`'s job.

Choices where the paper and reference code are silent:

* Which blocks feed the pyramid: 0-based ``ceil((i + 1) * L / 4) - 1`` for ``i = 0..3`` of an
  ``L``-block tower. For ``L = 12`` this is the reference's 2, 5, 8, 11; for shallower towers the
  four blocks stay evenly spaced and always include the last one (``L = 4``: 0, 1, 2, 3;
  ``L = 6``: 1, 2, 4, 5).
* Block outputs are taken raw (no final LayerNorm), CLS dropped, as a ``[B, width, h, w]`` grid.
* The text pass is open_clip's own (causal mask, pooling at the EOT token). Because the mask is
  causal, positions after the last EOT of a batch of prompts cannot change the pooled feature,
  so the prompt batch is cut to that length: same result, a third of the cost for CoOp prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wsiproto.errors import WsiprotoError


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """``count`` 0-based block indices evenly spread over ``depth`` blocks, ending at the last."""
    if depth < count:
        raise WsiprotoError(f"the vision tower has {depth} blocks; at least {count} are needed "
                            f"for a {count}-level pyramid")
    return [-(-(i + 1) * depth // count) - 1 for i in range(count)]


@dataclass
class BackboneConfig:
    """How to build the towers.

    ``open_clip_name`` names an open_clip architecture (``ViT-B-16``) built through
    ``open_clip.create_model``; ``open_clip_cfg`` instead gives a full open_clip model config
    (``embed_dim``, ``vision_cfg``, ``text_cfg``) for towers that open_clip does not list, such as
    the tiny test preset. ``blocks`` overrides :func:`evenly_spaced_blocks`. ``freeze`` keeps both
    towers fixed (the reference setting); ``quick_gelu`` must be true for OpenAI CLIP weights.
    """

    open_clip_name: str | None = None
    open_clip_cfg: dict[str, Any] | None = None
    quick_gelu: bool = False
    blocks: list[int] | None = None
    freeze: bool = True
    weights: str | None = field(default=None)  # informational: the file the towers came from

    def __post_init__(self):
        if (self.open_clip_name is None) == (self.open_clip_cfg is None):
            raise WsiprotoError("a backbone needs exactly one of 'open_clip_name' and 'open_clip_cfg'")

    @property
    def label(self) -> str:
        return self.open_clip_name or "custom-open_clip"

    def to_dict(self) -> dict:
        return {"open_clip_name": self.open_clip_name, "open_clip_cfg": self.open_clip_cfg,
                "quick_gelu": self.quick_gelu, "blocks": self.blocks, "freeze": self.freeze,
                "weights": self.weights}

    @classmethod
    def from_dict(cls, data: dict) -> BackboneConfig:
        known = {"open_clip_name", "open_clip_cfg", "quick_gelu", "blocks", "freeze", "weights"}
        unknown = set(data) - known
        if unknown:
            raise WsiprotoError(f"unknown backbone settings {sorted(unknown)}")
        return cls(**data)


class ClipBackbone(nn.Module):
    """Frozen (by default) open_clip towers exposing what DualProtoSeg needs.

    * :meth:`visual_features` -> four ``[B, width, h, w]`` token grids (coarse-to-fine order is
      decided by the head; here they come shallow to deep),
    * :meth:`tokenize`, :meth:`token_embedding`, :meth:`encode_prompts` for the CoOp learner.

    With ``freeze`` the towers have ``requires_grad=False``, run in eval mode whatever the parent's
    mode, and the vision pass runs without autograd; gradients still flow *through* the text tower
    to prompt embeddings fed into :meth:`encode_prompts`.
    """

    def __init__(self, clip: nn.Module, tokenizer, *, blocks: list[int] | None = None,
                 freeze: bool = True):
        super().__init__()
        visual = getattr(clip, "visual", None)
        if visual is None or not hasattr(visual, "forward_intermediates") \
                or not hasattr(visual, "transformer"):
            raise WsiprotoError("the backbone must be an open_clip ViT (VisionTransformer tower)")
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(clip, attr):
                raise WsiprotoError("the backbone must have open_clip's built-in text tower "
                                    f"(missing {attr}); HF text towers are not supported")
        self.clip = clip
        self.tokenizer = tokenizer
        depth = len(visual.transformer.resblocks)
        self.blocks = list(blocks) if blocks is not None else evenly_spaced_blocks(depth)
        if len(self.blocks) != 4 or not all(0 <= b < depth for b in self.blocks):
            raise WsiprotoError(f"backbone blocks must be 4 indices in 0..{depth - 1}, got {self.blocks}")
        self.frozen = bool(freeze)
        if self.frozen:
            self.clip.requires_grad_(False)
            self.clip.eval()

    # --- geometry ----------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        size = self.clip.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.clip.visual.patch_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def vision_width(self) -> int:
        return self.clip.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self.clip.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        proj = self.clip.text_projection
        if proj is None:
            return self.text_width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.clip.positional_embedding.shape[0]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.clip.eval()
        return self

    # --- vision ------------------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the four chosen blocks, CLS dropped, as ``[B, width, h, w]`` (shallow first)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.clip.visual.forward_intermediates(
                images, indices=self.blocks, stop_early=True, intermediates_only=True,
                output_fmt="NCHW")
        return out["image_intermediates"]

    # --- text --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        return tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(tokens)

    def _pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = getattr(self.clip, "text_pool_type", "argmax")
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        if pool == "last":
            return torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        raise WsiprotoError(f"text pooling {pool!r} is not supported for prompt learning")

    def encode_prompts(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``[N, embed_dim]`` of prompt embeddings ``[N, L, width]`` whose token ids
        (used only to find the pooling position) are ``tokens [N, L]``."""
        clip = self.clip
        pool_at = self._pool_index(tokens)
        attn_mask = getattr(clip, "attn_mask", None)
        length = embeddings.shape[1]
        if attn_mask is not None and getattr(clip, "text_pool_type", "argmax") != "last":
            length = int(pool_at.max()) + 1  # causal: later positions cannot reach the pooled one
            attn_mask = attn_mask[:length, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = embeddings[:, :length].to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_at]
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x
