"""The backbone interface: what DualProtoSeg needs from a vision-language model's two towers.

A backbone family (``wsiproto.model.backbones``: ``open_clip``, ``conch``) is one
:class:`Backbone` subclass that registers how to build its towers from a config, recognise and
load a weights file, tokenize, embed prompt tokens, encode prompts and return four intermediate
token grids. Everything outside the families (the CoOp learner, the factory's checkpoint
compaction, the training feature cache) talks to this interface only.

Choices shared by the families (where the paper and reference code are silent):

* Which blocks feed the pyramid: 0-based ``ceil((i + 1) * L / 4) - 1`` for ``i = 0..3`` of an
  ``L``-block tower. For ``L = 12`` this is the reference's 2, 5, 8, 11; for shallower towers the
  four blocks stay evenly spaced and always include the last one (``L = 4``: 0, 1, 2, 3;
  ``L = 6``: 1, 2, 4, 5).
* Block outputs are taken raw (no final LayerNorm), CLS dropped, as a ``[B, width, h, w]`` grid.
* With ``freeze`` the towers have ``requires_grad=False``, run in eval mode whatever the parent's
  mode, and the vision pass runs without autograd; gradients still flow *through* the text tower
  to prompt embeddings fed into :meth:`Backbone.encode_prompts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from wsiproto.errors import WsiprotoError

DEFAULT_FAMILY = "open_clip"  # configs saved before families existed are open_clip towers
COMMON_KEYS = ("family", "blocks", "freeze", "weights")


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """``count`` 0-based block indices evenly spread over ``depth`` blocks, ending at the last."""
    if depth < count:
        raise WsiprotoError(f"the vision tower has {depth} blocks; at least {count} are needed "
                            f"for a {count}-level pyramid")
    return [-(-(i + 1) * depth // count) - 1 for i in range(count)]


@dataclass
class BackboneConfig:
    """How to build the towers: the family, its own settings, and the shared ones.

    ``options`` are the family's settings (open_clip: ``open_clip_name`` or ``open_clip_cfg``,
    ``quick_gelu``; conch: ``conch_model``, ``image_size``), checked by the family. ``blocks``
    overrides :func:`evenly_spaced_blocks`; ``freeze`` keeps both towers fixed (the reference
    setting); ``weights`` names the file the towers came from (informational). In JSON the
    options sit beside the shared keys, and a config without ``family`` is an open_clip one.
    """

    family: str = DEFAULT_FAMILY
    options: dict[str, Any] = field(default_factory=dict)
    blocks: list[int] | None = None
    freeze: bool = True
    weights: str | None = None

    def __post_init__(self):
        self.options = self.family_class().check_options(dict(self.options))

    def family_class(self) -> type[Backbone]:
        from wsiproto.model.backbones import get_family

        return get_family(self.family)

    @property
    def label(self) -> str:
        return self.family_class().describe(self.options)

    def to_dict(self) -> dict:
        return {"family": self.family, **self.options, "blocks": self.blocks,
                "freeze": self.freeze, "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneConfig:
        data = dict(data)
        common = {k: data.pop(k) for k in COMMON_KEYS if k in data}
        common.setdefault("family", DEFAULT_FAMILY)
        return cls(options=data, **common)


class Backbone(nn.Module):
    """Frozen (by default) towers exposing what DualProtoSeg needs; one subclass per family.

    A family sets ``family`` (its registry name) and ``OPTIONS`` (its config keys and defaults)
    and implements the class methods (:meth:`describe`, :meth:`detect`, :meth:`build`) and the
    abstract members below. Geometry: ``image_size``/``patch_size`` (pixels, ``(h, w)``),
    ``vision_width`` (channels of the token grids), ``text_width`` (prompt embedding width),
    ``embed_dim`` (width of an encoded prompt), ``context_length`` (token slots of a prompt).
    """

    family: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Any]] = {}
    token_table: ClassVar[str] = ""  # state_dict name of the vocabulary embedding table

    def __init__(self, towers: nn.Module, *, depth: int, blocks: list[int] | None, freeze: bool):
        super().__init__()
        self.blocks = list(blocks) if blocks is not None else evenly_spaced_blocks(depth)
        if len(self.blocks) != 4 or not all(0 <= b < depth for b in self.blocks):
            raise WsiprotoError(f"backbone blocks must be 4 indices in 0..{depth - 1}, got {self.blocks}")
        self.frozen = bool(freeze)
        self.found = None  # what build() recognised in the weights file, if one was given
        if self.frozen:
            towers.requires_grad_(False)
            towers.eval()

    # --- family registry hooks ---------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The family's options with defaults filled in; unknown keys are an error."""
        unknown = set(options) - set(cls.OPTIONS)
        if unknown:
            raise WsiprotoError(f"unknown {cls.family} backbone settings {sorted(unknown)}")
        return {**cls.OPTIONS, **options}

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> str:
        """A short human label of the towers a config builds (for messages)."""
        raise NotImplementedError

    @classmethod
    def detect(cls, state: Mapping[str, torch.Tensor], path) -> Any:
        """A :class:`~wsiproto.model.weights.Found` if ``state`` is this family's, else None."""
        raise NotImplementedError

    @classmethod
    def fits(cls, options: Mapping[str, Any], found: Any) -> bool:
        """Whether a config with ``options`` builds towers of the architecture ``found`` is
        (used to suggest presets for a weights file)."""
        return True

    @classmethod
    def build(cls, config: BackboneConfig, found: Any = None) -> Backbone:
        """Towers for ``config``: random, or with the weights of ``found`` (already identified
        as this family's). Raises a one-line error when the weights do not fit the config."""
        raise NotImplementedError

    # --- the interface -----------------------------------------------------------------------
    def towers(self) -> nn.Module:
        """The module holding both towers (frozen together)."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.towers().eval()
        return self

    def visual_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the four chosen blocks, CLS dropped, as ``[B, width, h, w]`` (shallow first)."""
        raise NotImplementedError

    def vision_state(self) -> Mapping[str, torch.Tensor]:
        """The named tensors that :meth:`visual_features` depends on (for cache digests)."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (start token, text, end token, padding)."""
        raise NotImplementedError

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positions used per row, start and end tokens included."""
        raise NotImplementedError

    def truncated(self, tokens: torch.Tensor) -> torch.Tensor:
        """True for rows whose text may have been cut to fit the context."""
        raise NotImplementedError

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L, text_width]`` embeddings of token ids (moved to the table's device)."""
        raise NotImplementedError

    def encode_prompts(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``[N, embed_dim]`` of prompt embeddings ``[N, L, text_width]`` whose
        token ids ``[N, L]`` give the layout (padding, end token)."""
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features ``[N, embed_dim]`` by the towers' own text encoder (what
        :meth:`encode_prompts` of the tokens' embeddings must reproduce)."""
        raise NotImplementedError


def square(size) -> tuple[int, int]:
    """``(h, w)`` of an int or a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
