"""The ``open_clip`` family: open_clip CLIP ViT towers with open_clip's built-in text tower.

Builds a named open_clip architecture (``ViT-B-16``, ``ViT-B-32``) or a full open_clip model
config (``open_clip_cfg``, e.g. the tiny test preset). Weights files it recognises:

* OpenAI CLIP state dicts (``visual.conv1.weight`` ..., with OpenAI's ``input_resolution`` /
  ``context_length`` / ``vocab_size`` entries): towers trained with QuickGELU, so ``quick_gelu``
  is switched on;
* open_clip state dicts (QuiltNet-B-16 and any open_clip ViT): same tensor names; the
  activation is not recorded in the tensors, so it comes from an ``open_clip_config.json``
  beside the file when there is one, else from the preset;
* Hugging Face ``CLIPModel`` state dicts (PLIP, ``openai/clip-vit-*``): renamed onto open_clip's
  tensors exactly (separate q/k/v projections concatenated into ``in_proj``, the projection
  matrices transposed; nothing is approximated). Hugging Face CLIP configs default to QuickGELU;
  a ``config.json`` beside the file that says otherwise wins.

Text pass (the DESIGN's sound choice for open_clip towers): open_clip's own (causal mask, pooling
at the EOT token). Because the mask is causal, positions after the last EOT of a batch of prompts
cannot change the pooled feature, so the prompt batch is cut to that length: same result, a
third of the cost for CoOp prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from wsiproto.errors import WsiprotoError
from wsiproto.model.backbone import Backbone, BackboneConfig, square
from wsiproto.model.backbones import register_family
from wsiproto.model.weights import OPENAI_MARKERS, Found, check_shapes, sibling_config


@register_family
class OpenClipBackbone(Backbone):
    family = "open_clip"
    OPTIONS = {"open_clip_name": None, "open_clip_cfg": None, "quick_gelu": False}
    token_table = "clip.token_embedding.weight"

    def __init__(self, clip: nn.Module, tokenizer, *, blocks: list[int] | None = None,
                 freeze: bool = True):
        visual = getattr(clip, "visual", None)
        if visual is None or not hasattr(visual, "forward_intermediates") \
                or not hasattr(visual, "transformer"):
            raise WsiprotoError("the backbone must be an open_clip ViT (VisionTransformer tower)")
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(clip, attr):
                raise WsiprotoError("the backbone must have open_clip's built-in text tower "
                                    f"(missing {attr}); HF text towers are not supported")
        super().__init__(clip, depth=len(visual.transformer.resblocks), blocks=blocks,
                         freeze=freeze)
        self.clip = clip
        self.tokenizer = tokenizer

    # --- registry hooks ----------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        options = super().check_options(options)
        if (options["open_clip_name"] is None) == (options["open_clip_cfg"] is None):
            raise WsiprotoError("a backbone needs exactly one of 'open_clip_name' and 'open_clip_cfg'")
        text_cfg = (options["open_clip_cfg"] or {}).get("text_cfg", {})
        if "hf_tokenizer_name" in text_cfg or "hf_model_name" in text_cfg:
            raise WsiprotoError("custom backbones must use open_clip's built-in text tower")
        return options

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> str:
        name = options.get("open_clip_name") or "custom-open_clip"
        return f"open_clip {name}" + (" (quick_gelu)" if options.get("quick_gelu") else "")

    @classmethod
    def detect(cls, state: Mapping[str, torch.Tensor], path) -> Found | None:
        if "vision_model.embeddings.patch_embedding.weight" in state \
                and "text_model.embeddings.token_embedding.weight" in state:
            try:
                native = hf_clip_to_open_clip(state)
            except KeyError as err:
                raise WsiprotoError(f"a Hugging Face CLIPModel state dict without {err}", path=path,
                                    hint="give the full CLIPModel weights (both towers)") from None
            source, quick = "a Hugging Face CLIPModel state dict (PLIP format)", _hf_quick_gelu(path)
        elif {"visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
              "visual.transformer.resblocks.0.attn.in_proj_weight"} <= set(state):
            native = {k: v for k, v in state.items() if k not in OPENAI_MARKERS}
            if any(k in state for k in OPENAI_MARKERS):
                source, quick = "OpenAI CLIP", True
            else:
                source, quick = "open_clip", _open_clip_quick_gelu(path)
        else:
            return None
        activation = {True: ", quick_gelu", False: ", GELU", None: ""}[quick]
        facts = {"quick_gelu": quick, **_vit_facts(native)}
        return Found(cls.family, f"{source} {_vit_label(facts)}{activation}", native, path, facts)

    @classmethod
    def fits(cls, options: Mapping[str, Any], found: Found) -> bool:
        import open_clip

        cfg = options["open_clip_cfg"] or open_clip.get_model_config(options["open_clip_name"]) or {}
        vision = cfg.get("vision_cfg", {})
        return (vision.get("patch_size"), vision.get("width"), vision.get("layers")) == \
            (found.facts["patch"], found.facts["width"], found.facts["layers"])

    @classmethod
    def build(cls, config: BackboneConfig, found: Found | None = None) -> OpenClipBackbone:
        import open_clip

        options = config.options
        if found is not None and found.facts.get("quick_gelu") is not None:
            options["quick_gelu"] = bool(found.facts["quick_gelu"])  # the file knows better
        with _quiet_root_warnings():  # "No pretrained weights loaded": random towers first
            if options["open_clip_name"] is not None:
                name = options["open_clip_name"]
                if name not in open_clip.list_models():
                    raise WsiprotoError(f"open_clip has no architecture {name!r}")
                clip = open_clip.create_model(name, pretrained=None,
                                              force_quick_gelu=options["quick_gelu"])
                tokenizer = open_clip.get_tokenizer(name)
            else:
                cfg = json.loads(json.dumps(options["open_clip_cfg"]))
                clip = open_clip.CLIP(**cfg, quick_gelu=options["quick_gelu"])
                tokenizer = open_clip.SimpleTokenizer(
                    context_length=cfg.get("text_cfg", {}).get("context_length", 77))
        if found is not None:
            _load_into(clip, found)
        return cls(clip, tokenizer, blocks=config.blocks, freeze=config.freeze)

    # --- geometry ----------------------------------------------------------------------------
    def towers(self) -> nn.Module:
        return self.clip

    @property
    def image_size(self) -> tuple[int, int]:
        return square(self.clip.visual.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return square(self.clip.visual.patch_size)

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

    # --- vision ------------------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.clip.visual.forward_intermediates(
                images, indices=self.blocks, stop_early=True, intermediates_only=True,
                output_fmt="NCHW")
        return out["image_intermediates"]

    def vision_state(self) -> Mapping[str, torch.Tensor]:
        return self.clip.visual.state_dict()

    # --- text --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        return tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens)

    def _pool_type(self) -> str:
        return getattr(self.clip, "text_pool_type", "argmax")

    def _pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        pool = self._pool_type()
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        if pool == "last":
            return torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        raise WsiprotoError(f"text pooling {pool!r} is not supported for prompt learning")

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._pool_index(tokens) + 1

    def truncated(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._pool_type() == "last":
            return torch.zeros_like(tokens[:, 0], dtype=torch.bool)
        return self._pool_index(tokens) >= tokens.shape[1] - 1

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.clip.token_embedding
        return table(tokens.to(table.weight.device))

    def encode_prompts(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        pool_at = self._pool_index(tokens)
        attn_mask = getattr(clip, "attn_mask", None)
        length = embeddings.shape[1]
        if attn_mask is not None and self._pool_type() != "last":
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

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens.to(self.clip.token_embedding.weight.device))


# --- weights -----------------------------------------------------------------------------------
def _load_into(clip: nn.Module, found: Found) -> None:
    from open_clip.model import resize_pos_embed

    state = dict(found.state)
    scale = state.get("logit_scale")
    if scale is not None and scale.ndim != clip.logit_scale.ndim:
        state["logit_scale"] = scale.reshape(clip.logit_scale.shape)
    pos = state.get("visual.positional_embedding")
    if pos is not None and pos.shape[-1] == clip.visual.positional_embedding.shape[-1]:
        resize_pos_embed(state, clip)  # another input size of the same tower: interpolated
    check_shapes(state, clip.state_dict())
    clip.load_state_dict(state, strict=True)


def _count(state: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def _vit_facts(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Patch size, width, depth and input size of an open_clip-named vision tower."""
    conv = state["visual.conv1.weight"]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {"patch": int(conv.shape[-1]), "width": int(conv.shape[0]),
            "layers": _count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
            "image_size": grid * int(conv.shape[-1])}


def _vit_label(facts: Mapping[str, int]) -> str:
    """``ViT-B/16 at 224 px`` or a description of a ViT of another size."""
    if (facts["width"], facts["layers"]) == (768, 12):
        return f"ViT-B/{facts['patch']} at {facts['image_size']} px"
    return (f"ViT (patch {facts['patch']}, width {facts['width']}, {facts['layers']} blocks, "
            f"{facts['image_size']} px)")


def _open_clip_quick_gelu(path) -> bool | None:
    config = sibling_config(path, "open_clip_config.json")
    if config is None or "quick_gelu" not in config.get("model_cfg", {}):
        return None
    return bool(config["model_cfg"]["quick_gelu"])


def _hf_quick_gelu(path) -> bool:
    config = sibling_config(path, "config.json") or {}
    act = (config.get("vision_config") or {}).get("hidden_act", "quick_gelu")
    return act == "quick_gelu"  # transformers' CLIPConfig default, OpenAI's and PLIP's setting


# --- Hugging Face CLIPModel -> open_clip ------------------------------------------------------
_HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def hf_clip_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` state dict under open_clip's tensor names (exact: renames,
    q/k/v concatenation and transposes only). Unknown tensors are kept under their own names
    so that the shape check reports them."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {dst: take(src) for src, dst in _HF_TOP.items() if src in state}
    out.update({dst: take(src).T.contiguous() for src, dst in _HF_TRANSPOSED.items() if src in state})
    for tower, prefix in (("visual.", "vision_model."), ("", "text_model.")):
        for i in range(_count(state, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\.")):
            src, dst = f"{prefix}encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                for a, b in _HF_LAYER.items():
                    out[f"{dst}{b}.{kind}"] = take(f"{src}{a}.{kind}")
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
    for key, value in state.items():
        if key not in used and not key.endswith("position_ids"):  # buffers of old transformers
            out[key] = value
    return out


class _quiet_root_warnings:
    """open_clip warns on the root logger when it builds a tower without weights; wsiproto
    builds random towers on purpose (tests, benchmarks, the tiny preset) and loads weights
    itself afterwards."""

    def __enter__(self):
        import logging

        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.root.setLevel(self.level)
