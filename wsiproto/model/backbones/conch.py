"""The ``conch`` family: CONCH (CoCa) towers built by the ``conch-fork`` package.

CONCH's code is on PyPI as ``conch-fork`` (import name ``conch``; licence CC BY-NC-ND 4.0,
non-commercial use only). wsiproto depends on it as the optional extra
``pip install 'wsiproto[conch]'`` and only imports it; nothing of it is copied here.

What is built, as the DualProtoSeg reference builds it (``create_model_from_pretrained(
"conch_ViT-B-16", checkpoint, force_image_size=224)``): the ``conch_ViT-B-16`` config shipped in
the package (CoCa; timm ViT-B/16 trunk with attentional poolers; 768-wide, 12-layer text tower
with a CLS embedding, vocabulary 32,007, context 128), its input size forced to 224 px (14x14
tokens). Choices where the reference is silent or differs:

* The multimodal (captioning) decoder is not built: DualProtoSeg never uses it and CONCH's
  published weights do not contain it (the authors removed it); the conch package leaves it
  random. This saves 195 M parameters. ``text_decoder.*`` tensors in a file are ignored.
* Pyramid features: the raw outputs of trunk blocks 2, 5, 8, 11 (no final norm), CLS dropped,
  from timm's ``forward_intermediates``.
* Prompts are encoded with CONCH's own text pass, as ``CoCa.encode_text`` runs it: the last token
  slot is replaced by the CLS embedding, attention is causal plus CONCH's CLS mask over padding,
  and the CLS output goes through ``ln_final`` and ``text_projection``. (DESIGN notes that the
  reference runs the tower without a mask and reads the last position; we keep the pass CONCH
  was trained with.) Rows of padding that neither the CLS nor any text token can attend to are
  left out of the pass: same result, a fraction of the 128-token cost.
* Tokenizer: CONCH's byte-level BPE (``conch_byte_level_bpe_uncased.json``, shipped inside the
  wheel, so no download) loaded by the package's ``get_tokenizer``; texts are encoded as the
  package's ``tokenize`` does (127 tokens with start/end, padded, one pad slot appended for the
  CLS). conch-fork 0.1.0's ``tokenize`` calls ``batch_encode_plus``, which transformers 5
  removed; where it is missing the tokenizer is called with the same arguments.

Weights: CONCH's ``pytorch_model.bin`` (a flat state dict ``visual.trunk.*``, ``text.*``, ...;
a ``state_dict`` wrapper or ``module.`` prefix is also accepted), read with
``torch.load(weights_only=True)``. Its position embeddings are for 448 px (28x28 tokens) and are
resampled to the 224-px grid by the package's ``resize_pos_embed``, as the reference does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiproto.errors import WsiprotoError
from wsiproto.model.backbone import Backbone, BackboneConfig, square
from wsiproto.model.backbones import register_family
from wsiproto.model.weights import Found, TowerShapeMismatch, check_shapes

INSTALL_HINT = "pip install 'wsiproto[conch]'"
_MARKERS = ("visual.trunk.patch_embed.proj.weight", "text.cls_emb", "text.token_embedding.weight")
_DECODER = "text_decoder."
_UNUSED = ("visual.attn_pool_", "visual.ln_contrast.", "visual.ln_caption.", "visual.proj_contrast",
           "logit_scale")


def conch_package():
    """``conch.open_clip_custom``, or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():  # timm's "timm.models.layers is deprecated" on import
            warnings.simplefilter("ignore", FutureWarning)
            import conch.open_clip_custom as package
    except ImportError as err:
        raise WsiprotoError(f"the CONCH backbone needs the conch-fork package ({err})",
                            hint=INSTALL_HINT) from None
    return package


def conch_config(name: str, image_size: int) -> dict[str, Any]:
    """The package's model config ``name`` at ``image_size`` px, without the decoder."""
    from importlib import resources

    root = resources.files("conch.open_clip_custom") / "model_configs"
    path = root / f"{name}.json"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))
        raise WsiprotoError(f"conch-fork has no model config {name!r}", hint=f"use one of {known}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("custom_text", None)
    cfg["vision_cfg"]["image_size"] = int(image_size)  # force_image_size
    cfg["multimodal_cfg"]["layers"] = 0  # no captioning decoder (see the module docstring)
    return cfg


@register_family
class ConchBackbone(Backbone):
    family = "conch"
    OPTIONS = {"conch_model": "conch_ViT-B-16", "image_size": 224}
    token_table = "coca.text.token_embedding.weight"

    def __init__(self, coca: nn.Module, tokenizer, *, blocks: list[int] | None = None,
                 freeze: bool = True):
        super().__init__(coca, depth=len(coca.visual.trunk.blocks), blocks=blocks, freeze=freeze)
        self.coca = coca
        self.tokenizer = tokenizer

    # --- registry hooks ----------------------------------------------------------------------
    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> str:
        return f"CONCH {options['conch_model']} at {options['image_size']} px"

    @classmethod
    def detect(cls, state: Mapping[str, torch.Tensor], path) -> Found | None:
        if not all(k in state for k in _MARKERS):
            return None
        patch = int(state["visual.trunk.patch_embed.proj.weight"].shape[-1])
        grid = round((state["visual.trunk.pos_embed"].shape[1] - 1) ** 0.5) \
            if "visual.trunk.pos_embed" in state else 0
        vocab, width = state["text.token_embedding.weight"].shape
        dropped = sum(k.startswith(_DECODER) for k in state)
        native = {k: v for k, v in state.items() if not k.startswith(_DECODER)}
        label = (f"CONCH (CoCa ViT-B/{patch}, {grid * patch}-px position grid, text "
                 f"{width} wide, vocabulary {vocab}"
                 + (f", its {dropped} decoder tensor(s) ignored)" if dropped else ")"))
        return Found(cls.family, label, native, path, {"grid": grid, "vocab": int(vocab)})

    @classmethod
    def fits(cls, options: Mapping[str, Any], found: Found) -> bool:
        return True  # one architecture; the input size is resampled

    @classmethod
    def build(cls, config: BackboneConfig, found: Found | None = None) -> ConchBackbone:
        package = conch_package()
        options = config.options
        coca = package.CoCa(**conch_config(options["conch_model"], options["image_size"]))
        if found is not None:
            _load_into(coca, found)
        return cls(coca, package.get_tokenizer(), blocks=config.blocks, freeze=config.freeze)

    # --- geometry ----------------------------------------------------------------------------
    def towers(self) -> nn.Module:
        return self.coca

    @property
    def image_size(self) -> tuple[int, int]:
        return square(self.coca.visual.image_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return square(self.coca.visual.trunk.patch_embed.patch_size)

    @property
    def vision_width(self) -> int:
        return self.coca.visual.trunk.embed_dim

    @property
    def text_width(self) -> int:
        return self.coca.text.width

    @property
    def embed_dim(self) -> int:
        return self.coca.text.text_projection.shape[1]

    @property
    def context_length(self) -> int:
        return self.coca.text.context_length

    # --- vision ------------------------------------------------------------------------------
    def visual_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.coca.visual.trunk.forward_intermediates(
                images, indices=self.blocks, norm=False, stop_early=True, output_fmt="NCHW",
                intermediates_only=True)

    def vision_state(self) -> Mapping[str, torch.Tensor]:
        return self.coca.visual.trunk.state_dict()

    # --- text --------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        package = conch_package()
        try:
            return package.tokenize(self.tokenizer, texts)
        except AttributeError:  # transformers >= 5 has no batch_encode_plus: same call, new name
            ids = self.tokenizer(texts, max_length=self.context_length - 1,
                                 add_special_tokens=True, return_token_type_ids=False,
                                 truncation=True, padding="max_length", return_tensors="pt")
            return F.pad(ids["input_ids"], (0, 1), value=self.tokenizer.pad_token_id)

    def token_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens != self.coca.text.pad_id).sum(dim=-1)

    def truncated(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, -2] != self.coca.text.pad_id  # the 127 text slots are full

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.coca.text.token_embedding
        return table(tokens.to(table.weight.device))

    def encode_prompts(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        text = self.coca.text
        tokens, embeddings = tokens[:, :-1], embeddings[:, :-1]  # the last slot is the CLS's
        n, slots = tokens.shape
        cast = text.transformer.get_cast_dtype()
        mask = text.attn_mask[None, :slots + 1, :slots + 1] + text.build_cls_mask(tokens, cast)
        # Rows the CLS can see: up to the first padding slot (CONCH's CLS mask is shifted by one).
        keep = min(int(self.token_lengths(tokens).max()) + 1, slots)
        index = torch.cat([torch.arange(keep), torch.tensor([slots])]).to(tokens.device)
        mask = mask[:, index][:, :, index]
        cls = text.cls_emb.to(cast).expand(n, 1, -1)
        x = torch.cat([embeddings[:, :keep].to(cast), cls], dim=1)
        x = x + text.positional_embedding[index].to(cast)
        x = text.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        return text.ln_final(x[:, -1]) @ text.text_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.coca.text.token_embedding.weight
        return self.coca.encode_text(tokens.to(table.device), normalize=False)


def _load_into(coca: nn.Module, found: Found) -> None:
    """CONCH's tensors into ``coca``. Those DualProtoSeg never uses (the poolers and projection
    of the contrastive and captioning heads, the logit scale) may be absent from the file."""
    from conch.open_clip_custom.coca_model import resize_pos_embed

    state = dict(found.state)
    pos = state.get("visual.trunk.pos_embed")
    if pos is not None:
        if pos.shape[-1] != coca.visual.trunk.embed_dim:
            raise TowerShapeMismatch(f"visual.trunk.pos_embed is {list(pos.shape)} wide, the "
                                     f"towers need {coca.visual.trunk.embed_dim}")
        resize_pos_embed(state, coca)  # 448-px grid -> the forced input size, as the reference
    absent = check_shapes(state, coca.state_dict(), optional=_UNUSED)
    coca.load_state_dict(state, strict=not absent)
    if absent:
        found.label += f"; {len(absent)} tensors of unused heads absent, kept at their init"
