"""A reader over any handle with OpenSlide's Python API (OpenSlide itself, tiffslide)."""

from __future__ import annotations

from typing import Any

from wsiproto.slide.backends.base import SlideReader, Target, positive_float


class OpenSlideAPIReader(SlideReader):
    """Subclasses set ``prefix`` (the property namespace: ``openslide``, ``tiffslide``) and
    implement :meth:`_open_handle`."""

    prefix = "openslide"

    def __init__(self, target: Target):
        self.handle = self._open_handle(target)
        h = self.handle
        # Some backends open lazily: the geometry is read here, so a broken file fails here.
        self.dimensions = tuple(int(v) for v in h.dimensions)
        self.level_dimensions = tuple((int(w), int(hh)) for w, hh in h.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in h.level_downsamples)
        if int(h.level_count) != len(self.level_dimensions) or not self.level_dimensions:
            raise ValueError("inconsistent level count")
        self.properties = {str(k): str(v) for k, v in h.properties.items() if v is not None}
        self.vendor = self._prop("vendor") or None
        self.objective_power = positive_float(self._prop("objective-power"))
        mx, my = positive_float(self._prop("mpp-x")), positive_float(self._prop("mpp-y"))
        self.mpp = (mx, my) if mx and my else None
        self.bounds = self._bounds()
        self.associated_names = tuple(sorted(str(k) for k in h.associated_images.keys()))

    def _open_handle(self, target: Target) -> Any:
        raise NotImplementedError

    def _prop(self, key: str) -> str | None:
        return self.properties.get(f"{self.prefix}.{key}")

    def _bounds(self) -> tuple[int, int, int, int] | None:
        raw = [self._prop(f"bounds-{k}") for k in ("x", "y", "width", "height")]
        if all(v in (None, "") for v in raw):
            return None
        full_w, full_h = self.dimensions
        x0 = int(raw[0]) if raw[0] not in (None, "") else 0
        y0 = int(raw[1]) if raw[1] not in (None, "") else 0
        w = int(raw[2]) if raw[2] not in (None, "") else full_w - x0
        h = int(raw[3]) if raw[3] not in (None, "") else full_h - y0
        return x0, y0, w, h

    def read(self, level: int, x: int, y: int, width: int, height: int) -> Any:
        ds = self.level_downsamples[level]
        loc0 = (int(round(x * ds)), int(round(y * ds)))
        return self.handle.read_region(loc0, level, (width, height))

    def associated(self, name: str) -> Any:
        return self.handle.associated_images[name]

    def close(self) -> None:
        self.handle.close()
