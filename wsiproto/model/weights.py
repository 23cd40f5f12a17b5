"""Tower weights files: read safely, identify the family from tensor names and shapes.

``pretrained`` files are never trusted: ``.safetensors`` is read without pickle; anything else
goes through ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain
containers only and refuses every other object *before* creating it (so a pickle that would run
code is rejected, not executed). TorchScript archives (OpenAI's original ``.pt`` files) are code
and are refused too. A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a ``module.``
prefix (DataParallel) are undone.

Each registered family recognises its own state dicts (:meth:`Backbone.detect`) and returns a
:class:`Found`: a one-line description of what the file is, the tensors under the family's own
names, and what the file says about the architecture. Which family a file belongs to is read
from the file, never assumed from the preset; a preset of another family is a one-line error
naming both.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsiproto.errors import WsiprotoError

_WRAPPERS = ("state_dict", "model")
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's dicts


@dataclass
class Found:
    """What a weights file was identified as."""

    family: str                      # registry name of the family that recognised it
    label: str                       # e.g. "CONCH (CoCa ViT-B/16, 448-px position grid)"
    state: dict[str, torch.Tensor]   # tensors under the family's own names
    path: Path
    facts: dict[str, Any] = field(default_factory=dict)  # family-specific: quick_gelu, ...

    @property
    def name(self) -> str:
        return self.path.name


def first_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def weights_path(pretrained) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WsiprotoError("no such weights file", path=path,
                            hint="give a local tower weights file (.safetensors, .bin, .pt, .pth); "
                                 "nothing is downloaded")
    return path.resolve()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl")
                   for name in archive.namelist())


def _load_raw(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise WsiprotoError(f"not a readable safetensors file ({first_line(err)})", path=path,
                                hint="the file is truncated or damaged; download it again") from None
    if _is_torchscript(path):
        raise WsiprotoError("a TorchScript archive (code, not a state dict); refused without "
                            "running it", path=path,
                            hint="save its state_dict() with torch.save or as safetensors and "
                                 "pass that file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = wanted.group(1) if wanted else "objects that are not tensors"
        raise WsiprotoError(f"not a plain tensor state dict: its pickle asks for {what}; refused "
                            "without running it", path=path,
                            hint="load it where you trust it and re-save model.state_dict() with "
                                 "torch.save or as safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise WsiprotoError(f"not a readable PyTorch weights file ({first_line(err)})", path=path,
                            hint="the file is truncated or damaged; download it again") from None


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    for _ in range(2):  # {"state_dict": {...}} and {"model": {"module.x": ...}} style nesting
        if isinstance(obj, dict):
            inner = [obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)]
            if inner and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner[0]
    if not isinstance(obj, dict) or not obj:
        raise WsiprotoError(f"not a state dict (the file holds a {type(obj).__name__})", path=path,
                            hint="give a file saved from model.state_dict()")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, without running any code from it."""
    path = weights_path(path)
    state = _unwrap(_load_raw(path), path)
    markers = {k for k in OPENAI_MARKERS if k in state}  # OpenAI's ints, kept as a hint
    others = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and k not in markers]
    if others:
        raise WsiprotoError(f"not a tensor state dict ({others[0]!r} is a "
                            f"{type(state[others[0]]).__name__})", path=path,
                            hint="give a file saved from model.state_dict()")
    return state


def identify(path) -> Found:
    """Read ``path`` and name the family its tensors belong to, or refuse it in one line."""
    from wsiproto.model.backbones import families

    path = weights_path(path)
    state = read_state_dict(path)
    for family in families():
        found = family.detect(state, path)
        if found is not None:
            return found
    names = ", ".join(repr(k) for k in list(state)[:2])
    raise WsiprotoError(f"not the weights of a supported vision-language model: {len(state)} "
                        f"tensors named like {names}", path=path,
                        hint="give OpenAI CLIP, open_clip (QuiltNet), Hugging Face CLIPModel "
                             "(PLIP) or CONCH tower weights")


def sibling_config(path: Path, name: str) -> dict | None:
    """A JSON file distributed beside the weights (``config.json``, ``open_clip_config.json``)."""
    candidate = path.parent / name
    if not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mismatch(found: Found, preset: str, builds: str, presets: list[str]) -> WsiprotoError:
    """The one-line error for weights of another family or architecture than the preset's."""
    hint = (f"choose preset {' or '.join(presets)} for these weights" if presets
            else "no bundled preset builds these towers")
    return WsiprotoError(f"these weights are {found.label}, but preset {preset} builds {builds}",
                         path=found.path, hint=hint)


class TowerShapeMismatch(WsiprotoError):
    """The file is of the right family but another architecture than the config builds."""


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                 optional: tuple[str, ...] = ()) -> list[str]:
    """Raise :class:`TowerShapeMismatch` naming the first missing, extra or reshaped tensor.

    Tensors whose names start with one of ``optional`` may be missing (the towers keep their
    initial values); their names are returned."""
    absent = []
    for key, want in expected.items():
        if key not in state:
            if not optional or not key.startswith(optional):
                raise TowerShapeMismatch(f"the file has no {key}")
            absent.append(key)
        elif tuple(state[key].shape) != tuple(want.shape):
            raise TowerShapeMismatch(f"{key} is {list(state[key].shape)}, the towers need "
                                     f"{list(want.shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise TowerShapeMismatch(f"the file has {len(extra)} tensors the towers lack (e.g. {extra[0]})")
    return absent
