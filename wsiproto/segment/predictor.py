"""A saved DualProtoSeg model as a tile predictor for the segmentation pipeline.

``predict_scores`` takes RGB uint8 tiles and returns the per-pixel scores of
``wsiproto.model.masks.mask_scores`` (finest-level CAMs, min-max, gated by the model's own
class probabilities — the "predicted" protocol — and the background score), which the pipeline
blends across overlapping tiles before the argmax.

Device handling: ``auto`` picks CUDA when available. Tiles arrive on the device as uint8 (the
:class:`~wsiproto.segment.infer.BatchRunner` uploads them through pinned staging buffers) and
are normalised there; the scores stay there. On a GPU the model runs under bf16 autocast and
inference mode; on a CPU in fp32 (or with the weights cast to bf16 with ``precision="bf16"``,
faster on CPUs with AMX).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from wsiproto.errors import WsiprotoError
from wsiproto.files import update_sha256


BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "model" / "default"


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    """The absolute folder holding a saved model: ``path`` itself, or the best/last checkpoint
    of a ``wsiproto train`` run folder; ``None``: the model bundled with wsiproto."""
    if path is None:
        if not (BUNDLED_MODEL / "config.json").is_file():
            raise WsiprotoError(
                "no --model given and this installation has no bundled default model",
                hint="pass --model with a folder written by save_model or `wsiproto train`",
            )
        return BUNDLED_MODEL
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise WsiprotoError("no such model folder", path=p,
                            hint="pass a folder written by save_model or `wsiproto train`")
    if p.is_file():
        p = p.parent
    for candidate in (p, p / "best", p / "model", p / "last"):
        if (candidate / "config.json").is_file():
            return candidate
    raise WsiprotoError("not a wsiproto model folder (no config.json)", path=p,
                        hint="pass a folder written by save_model or `wsiproto train`")


def weights_digest(folder: Path) -> str:
    """16 hex digits of the SHA-256 of a model folder's weights and config."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        update_sha256(digest, f)
    return digest.hexdigest()[:16]


class DualProtoPredictor:
    """Wraps a DualProtoSeg model: uint8 tiles in, class scores [N, C + 1, t, t] out, both on
    the model's device."""

    def __init__(self, model, *, device: str = "auto", precision: str = "auto",
                 tta: bool = False, source: str | None = None, digest: str | None = None):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise WsiprotoError("--device cuda was asked for but no CUDA GPU is available",
                                hint="use --device cpu or auto")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "bf16-autocast" if self.cuda else "fp32"
        if precision not in ("fp32", "bf16", "bf16-autocast"):
            raise WsiprotoError(f"unknown precision {precision!r}", hint="use fp32, bf16 or auto")
        self.precision = precision
        self.model = model.to(self.device).eval()
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        cfg = model.config
        self.config = cfg
        self.tile_size = int(cfg.tile_size)
        self.mpp = float(cfg.mpp)
        self.num_classes = int(cfg.num_classes)
        self.classes = [(c.name, tuple(c.colour)) for c in cfg.classes.classes]
        self.background = (cfg.classes.background_name, tuple(cfg.classes.background_colour))
        self.tta = tta
        self.source = source
        self.digest = digest
        self.default_batch_size = 128 if self.cuda else 32
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self._mean = torch.tensor(cfg.mean, device=self.device, dtype=dtype).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, device=self.device, dtype=dtype).view(1, 3, 1, 1)
        self._dtype = dtype

    def describe(self) -> dict:
        return {
            "preset": self.config.preset,
            "source": self.source,
            "weights_sha256_16": self.digest,
            "classes": [n for n, _ in self.classes],
            "mpp": self.mpp,
            "tile_size": self.tile_size,
            "tta": self.tta,
            "precision": self.precision,
            "protocol": "predicted",
        }

    def predict_scores(self, tiles):
        """uint8 tiles [N, t, t, 3] (a tensor on this predictor's device, or an array) ->
        scores [N, C + 1, t, t] on the device, normalised there."""
        import torch

        from wsiproto.model.masks import mask_scores

        t = self.tile_size
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (t, t, 3):
            raise ValueError(f"tiles must be [N, {t}, {t}, 3] uint8, got {tuple(tiles.shape)}")
        x = torch.as_tensor(tiles).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(self._dtype).div_(255.0)
        x = (x - self._mean) / self._std
        with torch.inference_mode():
            if self.precision == "bf16-autocast":
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    scores, _ = mask_scores(self.model, x, tta=self.tta)
            else:
                scores, _ = mask_scores(self.model, x, tta=self.tta)
        return scores


def load_predictor(model: str | os.PathLike | None, *, device: str = "auto",
                   precision: str = "auto", tta: bool = False) -> DualProtoPredictor:
    """The predictor of a saved model folder (``None``: the bundled default model)."""
    from wsiproto.model import load_model

    folder = resolve_model_dir(model)
    net = load_model(folder)
    return DualProtoPredictor(net, device=device, precision=precision, tta=tta,
                              source=str(folder), digest=weights_digest(folder))
