"""Datasets (BCSS-WSSS, LUAD-HistoSeg, WSSS4LUAD, generic CSV) and patch transforms.

Torch-free at import: :mod:`wsiproto.data.transforms` imports torch only inside its tensor
functions.
"""

from wsiproto.data.crops import build_mask_crops
from wsiproto.data.datasets import (
    KINDS,
    LabelledPatches,
    MaskedPatches,
    detect_kind,
    open_dataset,
    parse_label,
    read_mask,
    read_rgb,
)
from wsiproto.data.mosaics import TILE_TO_BCSS, build_tile_mosaics
from wsiproto.data.transforms import (
    BCSS_MEAN,
    BCSS_STD,
    TILE_SIZE,
    EvalTransform,
    TrainTransform,
)

__all__ = [
    "BCSS_MEAN", "BCSS_STD", "KINDS", "TILE_SIZE", "EvalTransform", "LabelledPatches",
    "MaskedPatches", "TrainTransform", "detect_kind", "open_dataset", "parse_label", "read_mask",
    "read_rgb",
]
__all__ += ["TILE_TO_BCSS", "build_mask_crops", "build_tile_mosaics"]  # dataset builders
