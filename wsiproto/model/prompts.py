"""CoOp prompt learner: class-specific learnable context + class descriptions -> text prototypes.

For class ``c`` and each of its descriptions ``d`` the prompt is
``[SOS] ctx_c,1 .. ctx_c,n [tokens of "d."] [EOT]``: the ``n_ctx`` context vectors of the class
replace placeholder tokens in the token-embedding sequence, the frozen text tower encodes it, and
a learnable ``Linear(embed_dim, proto_dim)`` plus L2 normalisation gives one text prototype per
description. Gradients reach the context and the linear layer, never the tower. The learner
uses only the :class:`~wsiproto.model.backbone.Backbone` interface (tokenize, token lengths,
token embedding, encode prompts), so it works with every backbone family; the prompt text is
the same for all ("X X ... X description."), and each placeholder must be one token.

Initialisation (the paper says "from the embedding of 'a histopathology image of'"; the phrase is
usually shorter than ``n_ctx``): the phrase's token embeddings fill the *last* context positions,
so that the prompt reads "... a histopathology image of <description>"; leading positions get
N(0, 0.02) as in CoOp's generic init; a phrase longer than ``n_ctx`` keeps its last ``n_ctx``
tokens. Every class then gets its own N(0, ``noise_std``) perturbation so that classes do not
start identical.

Caching: in training (or whenever autograd is on) the prototypes are recomputed each call so that
gradients reach the context. Under ``no_grad``/``inference_mode`` in eval mode they are cached and
reused; the cache is dropped on ``train()``, ``load_state_dict``, device/dtype moves and whenever
the context or projection has been modified in place (tracked through tensor version counters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsiproto.errors import WsiprotoError
from wsiproto.model.backbone import Backbone

PLACEHOLDER = "X"


class PromptLearner(nn.Module):
    def __init__(self, backbone: Backbone, descriptions: list[list[str]], *, n_ctx: int = 16,
                 ctx_init: str = "a histopathology image of", noise_std: float = 0.01,
                 proto_dim: int = 512):
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        # The backbone is shared, not owned: keep it out of this module's parameters and state.
        object.__setattr__(self, "_backbone", backbone)
        self.n_ctx = n_ctx
        self.num_classes = len(descriptions)
        prompts, owners = [], []
        for c, texts in enumerate(descriptions):
            for text in texts:
                text = text.strip()
                prompts.append(" ".join([PLACEHOLDER] * n_ctx) + " " + text.rstrip(".") + ".")
                owners.append(c)
        tokens = backbone.tokenize(prompts)
        _check_layout(backbone, tokens, prompts, n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("owner", torch.as_tensor(owners, dtype=torch.long), persistent=False)
        ctx = torch.randn(self.num_classes, n_ctx, backbone.text_width) * 0.02
        if ctx_init:
            init = _phrase_embedding(backbone, ctx_init)[-n_ctx:]
            ctx[:, n_ctx - init.shape[0]:] = init
        ctx += torch.randn_like(ctx) * noise_std
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(backbone.embed_dim, proto_dim)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: self.invalidate())

    @property
    def num_prototypes(self) -> int:
        return self.tokens.shape[0]

    def invalidate(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.invalidate()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def _key(self) -> tuple:
        return (self.ctx._version, self.proj.weight._version, self.proj.bias._version,
                self.ctx.device, self.ctx.dtype)

    def forward(self) -> torch.Tensor:
        """Text prototypes ``[P_text, proto_dim]`` (L2-normalised), grouped class by class."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._cache is not None and self._cache[0] == self._key():
            return self._cache[1]
        backbone = self._backbone
        embeddings = backbone.token_embedding(self.tokens)
        ctx = self.ctx[self.owner].to(embeddings.dtype)
        embeddings = torch.cat(
            [embeddings[:, :1], ctx, embeddings[:, 1 + self.n_ctx:]], dim=1)
        features = backbone.encode_prompts(embeddings, self.tokens)
        protos = F.normalize(self.proj(features.to(self.proj.weight.dtype)), dim=-1)
        if cacheable:
            self._cache = (self._key(), protos)
        return protos


def _check_layout(backbone: Backbone, tokens: torch.Tensor, prompts: list[str], n_ctx: int) -> None:
    """Every prompt fits the context, and its ``n_ctx`` placeholders are ``n_ctx`` tokens."""
    cut = backbone.truncated(tokens)
    if bool(cut.any()):
        longest = prompts[int(cut.nonzero()[0])].split(" ", n_ctx)[-1]
        raise ValueError(f"description too long for the text context of "
                         f"{tokens.shape[1]} tokens with n_ctx={n_ctx}: {longest!r}")
    placeholder = backbone.tokenize([PLACEHOLDER])[0, 1]
    if not bool((tokens[:, 1:1 + n_ctx] == placeholder).all()):
        raise WsiprotoError(f"the {backbone.family} tokenizer does not make {n_ctx} placeholder "
                            f"tokens of {n_ctx} {PLACEHOLDER!r}s; prompt learning needs one token each")


@torch.no_grad()
def _phrase_embedding(backbone: Backbone, phrase: str) -> torch.Tensor:
    """Token embeddings ``[words, width]`` of ``phrase`` between its start and end tokens."""
    tokens = backbone.tokenize([phrase])
    words = int(backbone.token_lengths(tokens)[0]) - 2
    return backbone.token_embedding(tokens[0, 1:1 + words]).float().cpu()
