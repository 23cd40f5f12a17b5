"""One slide object over OpenSlide (first choice) and tiffslide (fallback).

Coordinates: every position that this module takes or returns is in level-0 pixels of the
slide's *bounds-cropped frame*: OpenSlide's ``openslide.bounds-x/y`` offset is subtracted, so
(0, 0) is the top-left pixel of the scanned area, as in QuPath. Pixels outside the slide (or
transparent in it) come back as one fill value (white by default) whatever the backend.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiproto.errors import WsiprotoError

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tiffslide")

# Physical pixel sizes outside this range are not whole-slide microscopy (a 72-dpi default
# written by a generic TIFF writer is 352 um/px): such TIFF resolution tags are ignored.
_PLAUSIBLE_MPP = (0.02, 50.0)


@dataclass(frozen=True)
class Bounds:
    """The scanned area in level-0 pixels of the full slide (OpenSlide ``bounds-*``)."""

    x: int
    y: int
    width: int
    height: int


def _classify_unreadable(path: Path) -> tuple[str, str]:
    """Why a file that no backend opened is unreadable: a message and what to do."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    tiff_magic = head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if tiff_magic:
        return (
            "TIFF file is truncated or corrupt",
            "re-copy or re-export the slide from its source (check its size and checksum)",
        )
    if len(head) >= 132 and head[128:132] == b"DICM":
        return (
            "DICOM file that neither OpenSlide nor tiffslide can read (unsupported DICOM flavour)",
            "convert it to a pyramidal TIFF (e.g. `wsidicomizer`/`bfconvert`) or export a WSI DICOM "
            "series with VL Whole Slide Microscopy instances",
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return (
            "not a slide: this is a text file",
            "pass the slide image itself (.svs, .tif, .ndpi, .mrxs, .scn, .vms, .bif, .dcm ...)",
        )
    return (
        "unsupported or unrecognised slide format",
        "use a format OpenSlide reads (.svs, .tif, .ndpi, .mrxs, .scn, .vms, .bif, DICOM WSI) or "
        "convert it to a pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid`)",
    )


def check_slide_path(path: str | os.PathLike) -> Path:
    """Fail with one actionable line when ``path`` cannot possibly be a slide file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WsiprotoError("no such file", path=p, hint="check the path and spelling")
    if p.is_dir():
        raise WsiprotoError(
            "is a directory, not a slide file",
            path=p,
            hint="pass the slide file inside it (for MIRAX pass the .mrxs file)",
        )
    if not os.access(p, os.R_OK):
        raise WsiprotoError("permission denied", path=p, hint="make the file readable (chmod +r)")
    if p.stat().st_size == 0:
        raise WsiprotoError(
            "empty file (0 bytes)", path=p, hint="the copy or download failed; copy the slide again"
        )
    return p


def _open_backend(name: str, path: Path) -> Any:
    if name == "openslide":
        import openslide

        return openslide.OpenSlide(str(path))
    if name == "tiffslide":
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    raise WsiprotoError(f"unknown backend {name!r}", hint=f"choose one of {', '.join(BACKENDS)}")


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _mpp_from_tiff_tags(path: Path) -> tuple[float, float] | None:
    """Pixel size from the first page's XResolution/YResolution/ResolutionUnit tags."""
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tf:
            tags = tf.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres, yres = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xres is None or yres is None:
                return None
            unit_value = int(unit.value)
            xr, yr = (float(v.value[0]) / float(v.value[1]) for v in (xres, yres))
    except Exception:  # not a TIFF, or unreadable tags: no TIFF-derived mpp
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit_value)  # inch, centimetre
    if um_per_unit is None or xr <= 0 or yr <= 0:
        return None
    mpp = (um_per_unit / xr, um_per_unit / yr)
    lo, hi = _PLAUSIBLE_MPP
    return mpp if all(lo <= m <= hi for m in mpp) else None


class Slide:
    """A whole-slide image: geometry, pixel size, associated images and region reads.

    ``backend``: ``"auto"`` (OpenSlide, else tiffslide), ``"openslide"`` or ``"tiffslide"``.
    ``mpp``: the level-0 pixel size in um/px to use instead of the slide's own (``mpp_source``
    is then ``"user"``; ``native_mpp`` keeps what the slide says). Without it: vendor metadata,
    then TIFF resolution tags, else ``mpp`` is ``None`` ("unknown").
    ``fill``: the RGB value of pixels outside the slide or transparent in it.

    A Slide is a context manager and picklable: the pickle holds the path and options, and the
    receiving process reopens the file. Reads are thread-safe. After an OpenSlide error (which
    latches the handle) the handle is reopened and the read is retried once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "auto",
        mpp: float | None = None,
        fill: int | tuple[int, int, int] = 255,
    ):
        self.path = check_slide_path(path)
        if backend not in ("auto", *BACKENDS):
            raise WsiprotoError(
                f"unknown slide backend {backend!r}", hint=f"use auto, {', '.join(BACKENDS)}"
            )
        if mpp is not None and not (_PLAUSIBLE_MPP[0] <= (_float_or_none(mpp) or 0) <= _PLAUSIBLE_MPP[1]):
            raise WsiprotoError(
                f"--mpp {mpp!r} is not a whole-slide pixel size",
                hint=f"give the level-0 pixel size in um/px, between {_PLAUSIBLE_MPP[0]:g} and "
                     f"{_PLAUSIBLE_MPP[1]:g} (e.g. 0.5 for a 20x scan, 0.25 for 40x)")
        self.requested_backend = backend
        self.user_mpp = None if mpp is None else float(mpp)
        fill_rgb = (fill,) * 3 if isinstance(fill, (int, np.integer)) else tuple(fill)
        self.fill = tuple(int(v) for v in fill_rgb)
        self._lock = threading.Lock()
        self._handle = None
        self.backend = ""
        self._open()
        self._read_metadata()

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> None:
        order = BACKENDS if self.requested_backend == "auto" else (self.requested_backend,)
        errors = []
        for name in order:
            try:
                handle = _open_backend(name, self.path)
                # Some backends open lazily: touch the geometry so a broken file fails here.
                _ = (handle.dimensions, handle.level_count, handle.level_dimensions)
            except WsiprotoError:
                raise
            except Exception as exc:  # each backend raises its own types
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                log.debug("backend %s failed on %s: %s", name, self.path, exc)
                continue
            self._handle, self.backend = handle, name
            if errors:
                log.warning("%s: %s; reading it with %s instead", self.path,
                            "; ".join(errors), name)
            return
        message, hint = _classify_unreadable(self.path)
        if self.requested_backend != "auto":
            hint = f"{hint}; or try --backend auto"
        raise WsiprotoError(message, path=self.path, hint=hint)

    def _reopen(self) -> None:
        old = self._handle
        self._handle = None
        try:
            if old is not None:
                old.close()
        except Exception:  # a latched handle may fail to close; it is dropped either way
            pass
        self._handle = _open_backend(self.backend, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def source(self) -> str:
        """Where the slide is, as outputs and messages may show it."""
        return str(self.path)

    def identity(self) -> dict:
        """What tells this slide's content apart from another's without reading it all: name,
        size in bytes and modification time (a changed file invalidates earlier results)."""
        st = self.path.stat()
        return {"name": self.path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def clone(self) -> Slide:
        """A second, independent handle on the same slide with the same options (one per
        reading thread)."""
        return Slide(self.path, backend=self.backend, mpp=self.user_mpp, fill=self.fill)

    def __getstate__(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "mpp": self.user_mpp,
            "fill": self.fill,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], backend=state["backend"], mpp=state["mpp"], fill=state["fill"])

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, size={self.size}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )

    # -- metadata ------------------------------------------------------------------------------
    def _prop(self, key: str) -> Any:
        props = self._handle.properties
        return props.get(f"{self.backend}.{key}")

    def _read_metadata(self) -> None:
        h = self._handle
        self.properties: dict[str, str] = {
            str(k): str(v) for k, v in h.properties.items() if v is not None
        }
        self.vendor: str | None = self._prop("vendor") or None
        self.dimensions: tuple[int, int] = tuple(int(v) for v in h.dimensions)
        self.level_count: int = int(h.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(hh)) for w, hh in h.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in h.level_downsamples)
        self.objective_power: float | None = _float_or_none(self._prop("objective-power"))
        self.associated_image_names: tuple[str, ...] = tuple(sorted(h.associated_images.keys()))

        bx, by, bw, bh = (self._prop(f"bounds-{k}") for k in ("x", "y", "width", "height"))
        full_w, full_h = self.dimensions
        x0 = int(bx) if bx not in (None, "") else 0
        y0 = int(by) if by not in (None, "") else 0
        w = int(bw) if bw not in (None, "") else full_w - x0
        h_ = int(bh) if bh not in (None, "") else full_h - y0
        self.bounds = Bounds(x0, y0, w, h_)

        mx, my = _float_or_none(self._prop("mpp-x")), _float_or_none(self._prop("mpp-y"))
        if mx and my:
            native, source = (mx, my), "vendor"
        elif (tags := _mpp_from_tiff_tags(self.path)) is not None:
            native, source = tags, "tiff-resolution"
        else:
            native, source = None, None
        self.native_mpp = None if native is None else (native[0] + native[1]) / 2
        self.native_mpp_source = source
        if self.user_mpp is not None:  # the user's value wins over the slide's own
            self.mpp_xy, self.mpp_source = (self.user_mpp, self.user_mpp), "user"
        else:
            self.mpp_xy, self.mpp_source = native, source

    @property
    def mpp(self) -> float | None:
        """Level-0 pixel size in um/px (mean of x and y), or None when unknown."""
        return None if self.mpp_xy is None else (self.mpp_xy[0] + self.mpp_xy[1]) / 2

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the bounds-cropped frame, in level-0 pixels."""
        return self.bounds.width, self.bounds.height

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise WsiprotoError(
                "the slide has no pixel size (no mpp in its metadata or TIFF tags)",
                path=self.path,
                hint="pass it with --mpp (e.g. --mpp 0.5 for a 20x scan, 0.25 for 40x)",
            )
        return self.mpp

    def downsample_for_mpp(self, mpp: float) -> float:
        return float(mpp) / self.require_mpp()

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1% slack)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self.associated_image_names:
            raise WsiprotoError(
                f"no associated image {name!r}",
                path=self.path,
                hint=f"available: {', '.join(self.associated_image_names) or 'none'}",
            )
        img = self._handle.associated_images[name]
        return np.asarray(img.convert("RGB"))

    # -- pixels --------------------------------------------------------------------------------
    def _backend_read(self, loc0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 of a region lying inside the level (level-0 location of the full frame),
        transparent pixels composited over the fill value (all in PIL's C code)."""
        from PIL import Image

        img = self._handle.read_region(loc0, level, size)
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        if img.mode == "RGBA":
            if img.getextrema()[3][0] < 255:
                background = Image.new("RGBA", img.size, (*self.fill, 255))
                img = Image.alpha_composite(background, img)
            img = img.convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(img)  # writeable (np.asarray of a PIL image is read-only)

    def read_level(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """RGB uint8 [height, width, 3] at native ``level``; (x, y) in level pixels of the
        bounds-cropped frame (level 0 of the frame scaled by the level's downsample)."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # The frame's origin in this level's pixels; intersect the request with the level.
        ox, oy = self.bounds.x / ds, self.bounds.y / ds
        ax0, ay0 = int(math.floor(ox + x)), int(math.floor(oy + y))
        ix0, iy0 = max(ax0, 0), max(ay0, 0)
        ix1, iy1 = min(ax0 + width, lw), min(ay0 + height, lh)
        if ix1 <= ix0 or iy1 <= iy0:
            out = np.empty((height, width, 3), np.uint8)
            out[...] = self.fill
            return out
        loc0 = (int(round(ix0 * ds)), int(round(iy0 * ds)))
        size = (ix1 - ix0, iy1 - iy0)
        rgb = self._read_with_retry(loc0, level, size)
        if (ix0, iy0, ix1, iy1) == (ax0, ay0, ax0 + width, ay0 + height):
            return rgb  # entirely inside the level: no padding
        out = np.empty((height, width, 3), np.uint8)
        out[...] = self.fill
        out[iy0 - ay0 : iy1 - ay0, ix0 - ax0 : ix1 - ax0] = rgb
        return out

    def _read_with_retry(self, loc0, level, size) -> np.ndarray:
        """Read once; on failure reopen the handle (OpenSlide errors latch) and read again.
        A second failure is reported with the region's coordinates, on a fresh handle."""
        for attempt in (0, 1):
            try:
                with self._lock:
                    if self._handle is None:
                        self._reopen()
                    return self._backend_read(loc0, level, size)
            except Exception as exc:
                log.debug("read failed on %s at %s level %d (attempt %d): %s",
                          self.path, loc0, level, attempt + 1, exc)
                with self._lock:
                    try:
                        self._reopen()
                    except Exception:
                        self._handle = None
                if attempt == 0:
                    continue
                raise WsiprotoError(
                    f"cannot decode region at level-0 x={loc0[0]} y={loc0[1]} "
                    f"size={size[0]}x{size[1]} level={level} ({type(exc).__name__}: {exc})",
                    path=self.path,
                    hint="the file is damaged or truncated; re-copy it from its source",
                ) from exc
        raise AssertionError("unreachable")

    def read_region(
        self,
        location: tuple[float, float],
        size: tuple[int, int],
        *,
        mpp: float | None = None,
        downsample: float | None = None,
        resample: str = "auto",
    ) -> np.ndarray:
        """RGB uint8 [h, w, 3] of ``size=(w, h)`` output pixels at ``mpp`` (or ``downsample``).

        ``location`` is the top-left corner in level-0 pixels of the bounds-cropped frame. The
        coarsest level not coarser than the request is read and resampled (area-style
        antialiasing when shrinking, bilinear when enlarging); neither given means level 0.
        """
        if mpp is not None and downsample is not None:
            raise ValueError("give mpp or downsample, not both")
        ds = 1.0 if mpp is None and downsample is None else (
            self.downsample_for_mpp(mpp) if mpp is not None else float(downsample)
        )
        if ds <= 0:
            raise ValueError("downsample must be positive")
        w, h = int(size[0]), int(size[1])
        x0, y0 = float(location[0]), float(location[1])
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        scale = ds / lds  # level pixels per output pixel
        if abs(scale - 1.0) < 1e-9 and float(x0 / lds).is_integer() and float(y0 / lds).is_integer():
            return self.read_level(int(x0 / lds), int(y0 / lds), w, h, level)
        lx0, ly0 = x0 / lds, y0 / lds
        # A large shrink is read and resampled in bands of output rows, so that its source (a
        # 2048^2 chunk read 2x down: 4100^2 px, ~200 MB with the backend's RGBA and the copies)
        # never exists whole. Box and nearest filters only see their own output pixel's box, so
        # bands give the same pixels as one read; wider filters read in one piece.
        rows = h
        if resample in ("auto", "box", "nearest") and scale > 1.0 + 1e-6:
            rows = max(1, int(BAND_SOURCE_PIXELS / ((w * scale + 3) * scale)))
        if rows >= h:
            return self._resample_rows(lx0, ly0, w, h, scale, level, resample)
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            out[r0:r1] = self._resample_rows(lx0, ly0 + r0 * scale, w, r1 - r0, scale, level,
                                             resample)
        return out

    def _resample_rows(self, lx0: float, ly0: float, w: int, h: int, scale: float, level: int,
                       resample: str) -> np.ndarray:
        """[h, w, 3] output pixels of ``scale`` level pixels each from level-pixel (lx0, ly0)."""
        # Region in level pixels, padded by one pixel for the resampling filter.
        lx1, ly1 = lx0 + w * scale, ly0 + h * scale
        rx0, ry0 = int(math.floor(lx0)) - 1, int(math.floor(ly0)) - 1
        rx1, ry1 = int(math.ceil(lx1)) + 1, int(math.ceil(ly1)) + 1
        src = self.read_level(rx0, ry0, rx1 - rx0, ry1 - ry0, level)
        return resample_box(src, (lx0 - rx0, ly0 - ry0, lx1 - rx0, ly1 - ry0), (w, h), resample)

    def thumbnail(self, max_size: int = 1024, *, mpp: float | None = None) -> tuple[np.ndarray, float]:
        """An RGB thumbnail of the bounds-cropped frame and its downsample (level-0 px per px).

        With ``mpp`` the thumbnail has that pixel size (when the slide's mpp is known), else its
        longer side is ``max_size``.
        """
        fw, fh = self.size
        if mpp is not None and self.mpp is not None:
            ds = max(mpp / self.mpp, 1.0)
        else:
            ds = max(max(fw, fh) / float(max_size), 1.0)
        w, h = max(1, int(round(fw / ds))), max(1, int(round(fh / ds)))
        ds_x, ds_y = fw / w, fh / h
        level = self.best_level(min(ds_x, ds_y))
        lds = self.level_downsamples[level]
        lw, lh = int(math.ceil(fw / lds)), int(math.ceil(fh / lds))
        # Read the level in strips so memory stays bounded by the strip, then shrink each strip.
        out = np.empty((h, w, 3), np.uint8)
        src_rows_per_row = ds_y / lds
        strip_rows = max(1, int(16_000_000 / (max(lw, 1) * src_rows_per_row)))
        y_out = 0
        while y_out < h:
            y_end = min(h, y_out + strip_rows)
            ly0, ly1 = y_out * ds_y / lds, y_end * ds_y / lds
            ry0, ry1 = int(math.floor(ly0)), min(int(math.ceil(ly1)), lh)
            src = self.read_level(0, ry0, lw, max(ry1 - ry0, 1), level)
            out[y_out:y_end] = resample_box(
                src, (0.0, ly0 - ry0, fw / lds, ly1 - ry0), (w, y_end - y_out), "auto"
            )
            y_out = y_end
        return out, (ds_x + ds_y) / 2


BAND_SOURCE_PIXELS = 1 << 23  # source pixels per band of a shrinking read (32 MB as RGBA)


def resample_box(
    src: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int], mode: str
) -> np.ndarray:
    """Resample the sub-pixel ``box`` (x0, y0, x1, y1) of ``src`` to ``size`` (w, h)."""
    from PIL import Image

    w, h = size
    if w <= 0 or h <= 0:
        return np.empty((max(h, 0), max(w, 0), 3), np.uint8)
    shrink = (box[2] - box[0]) / w
    if mode == "auto":
        filt = Image.Resampling.BOX if shrink > 1.0 + 1e-6 else Image.Resampling.BILINEAR
    else:
        filt = {
            "nearest": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR,
            "box": Image.Resampling.BOX,
            "lanczos": Image.Resampling.LANCZOS,
        }[mode]
    img = Image.fromarray(np.ascontiguousarray(src))
    return np.array(img.resize((w, h), resample=filt, box=box))


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide; see :class:`Slide`."""
    return Slide(path, backend=backend, mpp=mpp)
