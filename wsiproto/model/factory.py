"""Presets, building, weights, device and dtype; saving and loading checkpoints.

Everything that touches files lives here; the model modules only see configs and tensors.

* Presets are JSON files in ``presets/`` (``dualproto-tiny``, ``dualproto-vitb16``,
  ``dualproto-plip``, ``dualproto-conch``): a backbone family and its architecture plus head,
  data and mask settings. ``create_model`` overlays the caller's switches on a preset.
* Tower weights come only from a local file given as ``pretrained``, read without running code
  (:mod:`wsiproto.model.weights`). The file's family and architecture are read from its tensor
  names and shapes, never guessed from the preset: a file of another family or size than the
  preset builds is a one-line error naming both (and the presets that fit the file); what was
  found is kept as ``model.backbone.found`` and logged.
* A checkpoint is a directory: ``model.safetensors`` (all persistent tensors; with
  ``include_backbone=False`` the towers are left out and must be passed again on load) and
  ``config.json`` (format, classes, colours, descriptions, backbone, mpp, tile size,
  normalisation, mask settings, and the weights file's size and SHA-256). Loading never
  unpickles, checks size and checksum first, then every tensor name and shape against the model
  the config describes, and fails with one line naming the file otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from wsiproto.classes import get_class_table
from wsiproto.errors import WsiprotoError
from wsiproto.files import atomic_path, sha256_file, write_text_atomic
from wsiproto.model.backbone import Backbone, BackboneConfig
from wsiproto.model.dualproto import DualProtoConfig, DualProtoSeg
from wsiproto.model.weights import first_line

FORMAT = "wsiproto-dualproto"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_BACKBONE_KEYS = ("blocks", "freeze")  # plus the family's own options
log = logging.getLogger("wsiproto.model")


# --- presets -----------------------------------------------------------------------------------
def _preset_files() -> dict[str, Any]:
    root = resources.files("wsiproto.model") / "presets"
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names of the bundled presets."""
    return sorted(_preset_files())


def load_preset(name: str) -> dict[str, Any]:
    """The raw JSON of a preset."""
    files = _preset_files()
    if name not in files:
        raise WsiprotoError(f"unknown model preset {name!r}",
                            hint=f"choose one of {', '.join(sorted(files))}")
    return json.loads(files[name].read_text(encoding="utf-8"))


def build_config(preset: str = "dualproto-tiny", classes: Any = None,
                 **overrides: Any) -> DualProtoConfig:
    """A :class:`DualProtoConfig` from a preset, a class table and keyword overrides.

    Overrides may name any model/data setting (``n_ctx``, ``prototypes``, ``pyramid``,
    ``descriptions_per_class``, ``mpp``, ...), ``mask_alpha``/``thresholds``, or a backbone
    setting (``blocks``, ``freeze``, or one of the family's options such as ``quick_gelu``).
    """
    raw = load_preset(preset)
    table = get_class_table(classes if classes is not None else raw.get("classes", "bcss"))
    base = BackboneConfig.from_dict(raw["backbone"])
    backbone, backbone_keys = base.to_dict(), _BACKBONE_KEYS + tuple(base.options)
    model = dict(raw.get("model", {}))
    data = dict(raw.get("data", {}))
    masks = dict(raw.get("masks", {}))
    for key, value in overrides.items():
        if value is None and key not in ("descriptions_per_class", "image_prototypes_per_class"):
            continue
        if key in backbone_keys:
            backbone[key] = value
        elif key in DualProtoConfig._MODEL_KEYS:
            model[key] = value
        elif key in DualProtoConfig._DATA_KEYS:
            data[key] = value
        elif key == "mask_alpha":
            masks["alpha"] = value
        elif key == "thresholds":
            masks["thresholds"] = value
        else:
            raise WsiprotoError(f"unknown model option {key!r}")
    return DualProtoConfig.from_dict({"preset": raw.get("name", preset), "classes": table.to_dict(),
                                      "backbone": backbone, "model": model, "data": data,
                                      "masks": masks})


# --- towers ------------------------------------------------------------------------------------
def presets_for(found) -> list[str]:
    """The bundled presets whose towers fit an identified weights file."""
    names = []
    for name in list_presets():
        config = BackboneConfig.from_dict(load_preset(name)["backbone"])
        if config.family == found.family and config.family_class().fits(config.options, found):
            names.append(name)
    return names


def build_backbone(config: BackboneConfig, pretrained: str | os.PathLike | None = None, *,
                   preset: str = "custom") -> Backbone:
    """Towers of ``config``'s family: random, or from the local weights file ``pretrained``
    after identifying it (one-line errors for files of another family or architecture)."""
    from wsiproto.model.weights import TowerShapeMismatch, identify, mismatch

    family = config.family_class()
    found = identify(pretrained) if pretrained is not None else None
    if found is not None and (found.family != config.family
                              or not family.fits(config.options, found)):
        raise mismatch(found, preset, config.label, [p for p in presets_for(found) if p != preset])
    try:
        backbone = family.build(config, found)
    except TowerShapeMismatch as err:
        raise mismatch(found, preset, f"{config.label} ({err.detail})",
                       [p for p in presets_for(found) if p != preset]) from None
    if found is not None:
        backbone.found = found.label
        log.info("%s: %s", found.path, found.label)
    return backbone


# --- model -------------------------------------------------------------------------------------
def _place(model: torch.nn.Module, device: Any, dtype: Any) -> torch.nn.Module:
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def build_model(config: DualProtoConfig, pretrained: str | os.PathLike | None = None, *,
                seed: int | None = None) -> DualProtoSeg:
    """A model for ``config`` on the CPU in float32 (random init from ``seed`` when given)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = build_backbone(config.backbone, pretrained, preset=config.preset)
        if tuple(backbone.image_size) != (config.tile_size, config.tile_size):
            raise WsiprotoError(f"tile size {config.tile_size} does not match the vision tower's "
                                f"input size {backbone.image_size}")
        try:
            return DualProtoSeg(config, backbone)
        except ValueError as err:
            raise WsiprotoError(first_line(err, 300)) from None


def create_model(preset: str = "dualproto-tiny", *, classes: Any = None,
                 pretrained: str | os.PathLike | None = None, unfreeze: bool = False,
                 device: Any = "cpu", dtype: Any = None, seed: int | None = None,
                 **overrides: Any) -> DualProtoSeg:
    """Build a DualProtoSeg model from a preset.

    ``classes``: a registered table name (``"bcss"``, ``"luad-histoseg"``, ``"wsss4luad"``), a
    :class:`~wsiproto.classes.ClassTable`, its dict, or a list of class names (default: the
    preset's). ``pretrained``: a local tower weights file (its family and architecture must be
    the preset's; ``model.backbone.found`` says what it was identified as), else random towers. ``unfreeze``
    trains the towers too. Other keywords override preset settings (see :func:`build_config`),
    e.g. ``prototypes="text"``, ``n_ctx=8``, ``descriptions_per_class=5``, ``pyramid=False``.
    """
    if unfreeze:
        overrides["freeze"] = False
    config = build_config(preset, classes, **overrides)
    if pretrained is not None:
        config.backbone.weights = Path(pretrained).name
    model = build_model(config, pretrained, seed=seed)
    return _place(model, device, dtype)


# --- checkpoints -------------------------------------------------------------------------------
def save_model(model: DualProtoSeg, directory: str | os.PathLike, *,
               include_backbone: bool = True, half: bool = False) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the directory.

    ``include_backbone=False`` leaves the (frozen) towers out, e.g. to ship a ViT-B-16 model
    without 600 MB of CLIP weights; :func:`load_model` then needs the same tower weights file.
    ``half`` stores floating-point tensors as float16 (half the size; loaded back as float32),
    for shipping a model; evaluate the stored model, not the one in memory.
    """
    from safetensors.torch import save_file

    from wsiproto import __version__

    if include_backbone is False and not model.backbone.frozen:
        raise WsiprotoError("an unfrozen backbone was trained and must be saved with the model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
               if include_backbone or not k.startswith("backbone.")}
    _compact_token_embedding(model, tensors)
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    weights = directory / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "wsiproto_version": __version__,
              **model.config.to_dict(),
              "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size,
                          "sha256": sha256_file(weights), "tensors": len(tensors),
                          "includes_backbone": bool(include_backbone),
                          "stored_dtype": "float16" if half else "float32"}}
    text = json.dumps(config, indent=2) + "\n"
    write_text_atomic(directory / CONFIG_FILE, text)
    return directory


ROWS_USED, ROWS_VALUES = ".rows_used", ".rows_values"


def _token_table_key(backbone: Backbone) -> str:
    return f"backbone.{backbone.token_table}"


def _compact_token_embedding(model: DualProtoSeg, tensors: dict[str, torch.Tensor]) -> None:
    """Keep only the token-embedding rows the model's prompts use (exact: no other row ever
    reaches an output). The vocabulary table is most of a CLIP text tower (49408 x width), so
    this makes a tiny model about 4x and a ViT-B-16 one about 100 MB smaller."""
    key = _token_table_key(model.backbone)
    if key not in tensors:
        return
    prompts = getattr(model, "prompts", None)
    used = (torch.unique(prompts.tokens.detach().cpu()) if prompts is not None
            else torch.zeros(0, dtype=torch.long))
    table = tensors.pop(key)
    tensors[key + ROWS_USED] = used.to(torch.int64).contiguous()
    tensors[key + ROWS_VALUES] = table[used].contiguous()


def _expand_token_embedding(tensors: dict[str, torch.Tensor],
                            expected: Mapping[str, torch.Tensor], key: str) -> None:
    """Inverse of :func:`_compact_token_embedding`; unused rows are zeros."""
    if key + ROWS_USED not in tensors or key not in expected:
        return
    rows, values = tensors.pop(key + ROWS_USED), tensors.pop(key + ROWS_VALUES)
    full = torch.zeros_like(expected[key], dtype=values.dtype)
    if rows.numel() and (int(rows.max()) >= full.shape[0] or values.shape[1:] != full.shape[1:]):
        return  # left as is: the shape check reports the mismatch
    full[rows] = values
    tensors[key] = full


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed and format-checked ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE if directory.is_dir() else directory
    if not path.is_file():
        raise WsiprotoError("not a wsiproto model (no config.json)", path=directory,
                            hint="give the directory written by save_model / wsiproto train")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WsiprotoError(f"config is not valid JSON ({first_line(err)})", path=path,
                            hint="the file is damaged; re-copy the model directory") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WsiprotoError(f"not a {FORMAT} config", path=path)
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise WsiprotoError(f"model format {data.get('format_version')} is newer than this "
                            f"wsiproto understands ({FORMAT_VERSION})", path=path,
                            hint="upgrade wsiproto")
    return data


def _check_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    reshaped = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k} {list(tensors[k].shape)} "
                        f"where the config implies {list(expected[k].shape)})")
    raise WsiprotoError(f"weights do not match config.json: {', '.join(problems)}", path=path,
                        hint="config.json and model.safetensors come from different models; "
                             "re-save or re-copy the model directory")


def load_model(directory: str | os.PathLike, *, pretrained: str | os.PathLike | None = None,
               device: Any = "cpu", dtype: Any = None, verify: bool = True) -> DualProtoSeg:
    """Load a model saved by :func:`save_model`, in eval mode.

    ``pretrained``: the tower weights file, needed only for checkpoints saved without their
    backbone. ``verify`` checks the weights file's SHA-256 against config.json.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    data = read_config(directory)
    info = data.get("weights") or {}
    weights = directory / str(info.get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise WsiprotoError("weights file missing", path=weights, hint="re-copy the model directory")
    size = weights.stat().st_size
    if "bytes" in info and size != int(info["bytes"]):
        raise WsiprotoError(f"weights file is {size} bytes, config.json expects {info['bytes']} "
                            "(truncated or replaced)", path=weights, hint="re-copy the model directory")
    if verify and "sha256" in info and sha256_file(weights) != info["sha256"]:
        raise WsiprotoError("weights file does not match the checksum in config.json (damaged or "
                            "replaced)", path=weights, hint="re-copy the model directory")
    try:
        config = DualProtoConfig.from_dict(data)
    except WsiprotoError as err:
        if err.path is not None:
            raise
        raise WsiprotoError(f"invalid model configuration: {err.detail}",
                            path=directory / "config.json",
                            hint=err.hint or "re-copy the model folder, or save the model again "
                                             "with save_model") from None
    includes_backbone = bool(info.get("includes_backbone", True))
    if not includes_backbone and pretrained is None:
        raise WsiprotoError("this model was saved without its backbone weights", path=directory,
                            hint=f"pass the {config.backbone.label} weights file "
                                 f"({config.backbone.weights or 'the one used for training'})")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise WsiprotoError(f"not a readable safetensors file ({first_line(err)})", path=weights,
                            hint="the file is truncated or damaged; re-copy the model directory") from None
    model = build_model(config, pretrained if not includes_backbone else None)
    expected = {k: v for k, v in model.state_dict().items()
                if includes_backbone or not k.startswith("backbone.")}
    _expand_token_embedding(tensors, expected, _token_table_key(model.backbone))
    _check_tensors(weights, tensors, expected)
    model.load_state_dict(tensors, strict=includes_backbone)
    model = _place(model, device, dtype)
    return model.eval()


