"""The reader interface every slide backend implements, and the spec it registers with.

A reader is the thin part: it opens one slide, says what the file says (levels, downsamples,
pixel size, bounds, associated images) and returns the pixels of a rectangle lying inside one
level. Everything a user relies on whatever the backend (the bounds-cropped frame, pixel size
fallbacks, one fill value, retry and reopen, resampling) is :class:`wsiproto.slide.Slide`'s.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Level-0 pixel sizes (um/px) a whole-slide scan can have: a TIFF resolution tag outside it
#: (a generic writer's 72 dpi is 352 um/px) is ignored, a ``--mpp`` outside it refused.
PLAUSIBLE_MPP = (0.02, 50.0)

#: What a slide location is: a local file, a local folder (a DICOM series), or an fsspec URL.
KINDS = ("file", "folder", "url")


@dataclass(frozen=True)
class Target:
    """Where a slide is. ``location``: a local path or the full URL (credentials in a query
    string included: only the reader sees it); ``shown``: what messages and outputs may show;
    ``suffix``: lower-case file suffix (``.dcm`` for DICOM, whatever the name);
    ``facts``: for a URL, what :func:`wsiproto.slide.urls.stat` said."""

    kind: str
    location: str
    shown: str
    suffix: str
    facts: dict | None = field(default=None, compare=False)  # a URL's size, ETag ...


class SlideReader:
    """One open slide. Subclasses set the attributes in ``__init__`` and implement
    :meth:`read`, :meth:`associated` and :meth:`close`.

    Attributes: ``dimensions`` (level-0 width, height of the full frame), ``level_dimensions``,
    ``level_downsamples``, ``mpp`` ((x, y) um/px from the slide's metadata, or None),
    ``bounds`` ((x, y, width, height) of the scanned area in level-0 pixels, or None for the
    whole frame), ``vendor``, ``objective_power``, ``properties`` (str -> str),
    ``associated_names``.
    """

    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None = None
    bounds: tuple[int, int, int, int] | None = None
    vendor: str | None = None
    objective_power: float | None = None
    properties: dict[str, str]
    associated_names: tuple[str, ...] = ()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> Any:
        """Pixels of the rectangle (x, y, width, height) in ``level``'s own pixels of the full
        frame, lying inside the level: a PIL image or an array, RGB or RGBA."""
        raise NotImplementedError

    def associated(self, name: str) -> Any:
        """An associated image (label, macro, thumbnail ...) as a PIL image or an array."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Backend:
    """A registered reader. ``priority``: lower is tried first by ``backend="auto"``, among the
    backends that read the target's kind (a backend listing the target's suffix goes before
    one that does not). ``requires``: importable modules; ``install``: what to install."""

    name: str
    priority: int
    reader: type
    kinds: frozenset[str]
    suffixes: tuple[str, ...]
    requires: tuple[str, ...]
    install: str
    summary: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def available(self) -> bool:
        """Whether the packages this backend imports are installed (nothing is imported)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)

    def open(self, target: Target) -> SlideReader:
        return self.reader(target)


def positive_float(value: Any) -> float | None:
    """``float(value)`` when it is a finite positive number, else None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def as_pil(img: Any):
    """A PIL image of ``img`` (already one, or an H x W x C uint8 array)."""
    from PIL import Image

    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
