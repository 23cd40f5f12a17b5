"""DualProtoSeg in PyTorch: vision-language towers from a backbone registry (open_clip, CONCH),
CoOp text prototypes, image prototypes, a multi-scale pyramid and CAM-based masks.

Public API::

    from wsiproto.model import create_model, save_model, load_model, predict_masks

    model = create_model("dualproto-tiny", classes="bcss")          # random towers
    model = create_model("dualproto-vitb16", pretrained="quilt.safetensors")
    model = create_model("dualproto-conch", pretrained="pytorch_model.bin")  # wsiproto[conch]
    out = model(images)            # images: normalised float [B, 3, 224, 224]
    out.logits                     # 4 x [B, C], coarse to fine
    out.cams                       # 4 x [B, C, h, w], h = 28, 56, 112, 224
    masks = predict_masks(model, images)             # int64 [B, 224, 224], C = background
    save_model(model, "run/model"); model = load_model("run/model")
"""

from wsiproto.model.backbone import Backbone, BackboneConfig, evenly_spaced_blocks
from wsiproto.model.backbones import get_family, list_families
from wsiproto.model.backbones.open_clip import OpenClipBackbone
from wsiproto.model.dualproto import DualProtoConfig, DualProtoOutput, DualProtoSeg
from wsiproto.model.factory import (
    build_config,
    create_model,
    list_presets,
    load_model,
    load_preset,
    read_config,
    save_model,
)
from wsiproto.model.masks import (
    class_maps,
    dense_crf,
    gate_maps,
    mask_scores,
    predict_masks,
    presence,
)
from wsiproto.model.weights import identify

ClipBackbone = OpenClipBackbone  # the name before backbone families existed

__all__ = [
    "Backbone",
    "BackboneConfig",
    "ClipBackbone",
    "OpenClipBackbone",
    "DualProtoConfig",
    "DualProtoOutput",
    "DualProtoSeg",
    "build_config",
    "class_maps",
    "create_model",
    "dense_crf",
    "evenly_spaced_blocks",
    "gate_maps",
    "get_family",
    "identify",
    "list_families",
    "list_presets",
    "load_model",
    "load_preset",
    "mask_scores",
    "predict_masks",
    "presence",
    "read_config",
    "save_model",
]
