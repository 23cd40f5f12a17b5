"""DualProtoSeg in PyTorch: open_clip towers, CoOp text prototypes, image prototypes, a
multi-scale pyramid and CAM-based masks.

Public API::

    from wsiproto.model import create_model, save_model, load_model, predict_masks

    model = create_model("dualproto-tiny", classes="bcss")          # random towers
    model = create_model("dualproto-vitb16", pretrained="quilt.safetensors")
    out = model(images)            # images: normalised float [B, 3, 224, 224]
    out.logits                     # 4 x [B, C], coarse to fine
    out.cams                       # 4 x [B, C, h, w], h = 28, 56, 112, 224
    masks = predict_masks(model, images)             # int64 [B, 224, 224], C = background
    save_model(model, "run/model"); model = load_model("run/model")
"""

from wsiproto.model.backbone import BackboneConfig, ClipBackbone, evenly_spaced_blocks
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

__all__ = [
    "BackboneConfig",
    "ClipBackbone",
    "DualProtoConfig",
    "DualProtoOutput",
    "DualProtoSeg",
    "build_config",
    "class_maps",
    "create_model",
    "dense_crf",
    "evenly_spaced_blocks",
    "gate_maps",
    "list_presets",
    "load_model",
    "load_preset",
    "mask_scores",
    "predict_masks",
    "presence",
    "read_config",
    "save_model",
]
