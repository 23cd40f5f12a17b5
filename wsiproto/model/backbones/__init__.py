"""The backbone registry: one module per family, registered by name (as timm registers models).

A family is a :class:`~wsiproto.model.backbone.Backbone` subclass decorated with
:func:`register_family`. Family modules import their heavy packages (open_clip, conch) only
inside functions, so listing the families costs nothing.

Registered: ``open_clip`` (OpenAI CLIP, open_clip checkpoints such as QuiltNet, Hugging Face
``CLIPModel`` state dicts such as PLIP, mapped exactly onto open_clip towers) and ``conch``
(CONCH's CoCa through the optional ``conch-fork`` package: ``pip install 'wsiproto[conch]'``).
"""

from __future__ import annotations

from wsiproto.errors import WsiprotoError

_FAMILIES: dict = {}


def register_family(cls):
    """Class decorator: make a Backbone subclass buildable by its ``family`` name."""
    if not cls.family or cls.family in _FAMILIES:
        raise ValueError(f"backbone family {cls.family!r} is unnamed or registered twice")
    _FAMILIES[cls.family] = cls
    return cls


def get_family(name: str):
    if name not in _FAMILIES:
        raise WsiprotoError(f"unknown backbone family {name!r}",
                            hint=f"choose one of {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def families() -> list:
    """The family classes, in registration order (the order weights files are tried in)."""
    return list(_FAMILIES.values())


from wsiproto.model.backbones import conch, open_clip  # noqa: E402,F401  (they register)
