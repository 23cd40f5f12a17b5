"""One slide object over the registered readers (:mod:`wsiproto.slide.backends`).

Coordinates: every position that this module takes or returns is in level-0 pixels of the
slide's *bounds-cropped frame*: OpenSlide's ``openslide.bounds-x/y`` offset is subtracted, so
(0, 0) is the top-left pixel of the scanned area, as in QuPath. Pixels outside the slide (or
transparent in it, such as a missing tile) come back as one fill value (white by default)
whatever the backend. A slide whose pixels cannot be read is an error, never an empty slide
(:mod:`wsiproto.slide.integrity`).
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
from wsiproto.slide import urls
from wsiproto.slide.backends import Target, candidates, get_backend
from wsiproto.slide.backends.base import PLAUSIBLE_MPP, as_pil, positive_float
from wsiproto.slide.integrity import check_tiff, corrupt, library_log
from wsiproto.slide.source import check_slide_path, is_tiff, resolve, unreadable

__all__ = ["Bounds", "Slide", "check_slide_path", "open_slide", "resample_box"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bounds:
    """The scanned area in level-0 pixels of the full slide (OpenSlide ``bounds-*``)."""

    x: int
    y: int
    width: int
    height: int


class ReadFailure(Exception):
    """A read the decoding library complained about (its log), or returned short."""


class Slide:
    """A whole-slide image: geometry, pixel size, associated images and region reads.

    ``path``: a slide file, a folder holding a DICOM WSI series, or a URL (``https://``,
    ``s3://``, any fsspec URL; see :mod:`wsiproto.slide.urls`). ``backend``: ``"auto"`` (the
    registered readers by priority) or one of :func:`wsiproto.slide.backend_names`.
    ``mpp``: the level-0 pixel size in um/px to use instead of the slide's own (``mpp_source``
    is then ``"user"``; ``native_mpp`` keeps what the slide says). Without it: the format's
    metadata (``"vendor"``; DICOM pixel spacing included), then TIFF resolution tags
    (``"tiff-resolution"``), else ``mpp`` is ``None`` ("unknown").
    ``fill``: the RGB value of pixels outside the slide or transparent in it.

    ``source`` is what outputs and messages show (a URL without its query string or user
    info); ``path`` is where the slide is (a Path, or the URL as given). A Slide is a context
    manager and picklable: the pickle holds the location and options, and the receiving
    process reopens it. Reads are thread-safe. After a failed read the handle is reopened and
    the read retried once (OpenSlide's errors latch a handle).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "auto",
        mpp: float | None = None,
        fill: int | tuple[int, int, int] = 255,
    ):
        if backend != "auto":
            get_backend(backend)  # an unknown name is refused before the file is looked at
        if mpp is not None and not (PLAUSIBLE_MPP[0] <= (positive_float(mpp) or 0) <= PLAUSIBLE_MPP[1]):
            raise WsiprotoError(
                f"--mpp {mpp!r} is not a whole-slide pixel size",
                hint=f"give the level-0 pixel size in um/px, between {PLAUSIBLE_MPP[0]:g} and "
                     f"{PLAUSIBLE_MPP[1]:g} (e.g. 0.5 for a 20x scan, 0.25 for 40x)")
        self.target: Target = resolve(path)
        self.path: Path | str = (self.target.location if self.target.kind == "url"
                                 else Path(self.target.location))
        self.requested_backend = backend
        self.user_mpp = None if mpp is None else float(mpp)
        fill_rgb = (fill,) * 3 if isinstance(fill, (int, np.integer)) else tuple(fill)
        self.fill = tuple(int(v) for v in fill_rgb)
        self._lock = threading.Lock()
        self._reader = None
        self.backend = ""
        tiff_mpp = self._check_structure()
        self._open()
        self._read_metadata(tiff_mpp)
        if not self._tiff:
            self._probe_levels()

    # -- opening -------------------------------------------------------------------------------
    def _check_structure(self) -> tuple[float, float] | None:
        """The TIFF structure check of :mod:`integrity` for TIFF files and URLs (whatever the
        backend); returns the TIFF resolution tags' pixel size."""
        t = self.target
        self._tiff = False
        if t.kind == "folder":
            return None
        if t.kind == "file":
            with open(t.location, "rb") as fh:
                if not is_tiff(fh.read(4)):
                    return None
            self._tiff = True
            return check_tiff(t.location, os.path.getsize(t.location), t.shown)
        self._tiff = True
        try:
            with urls.open_url(t.location, t.facts) as fh:
                if not is_tiff(fh.read(4)):
                    raise unreadable(t)
                fh.seek(max(t.facts["bytes"] - 1, 0))
                fh.read(1)  # a server that ignores Range requests fails here, said as such
                fh.seek(0)
                return check_tiff(fh, t.facts["bytes"], t.shown)
        except WsiprotoError:
            urls.stat(t.location)  # the server gone is said as such, not as a corrupt file
            raise
        except Exception as exc:
            raise urls.remote_error(exc, t.location) from None

    def _probe_levels(self) -> None:
        """Formats without a structure check (DICOM, MIRAX, VMS ...): the last pixel of every
        level is decoded at open, so that a file cut short fails here, in one line, and not
        as the run's last chunk (a DICOM instance's frame table reaches its last frame)."""
        for level, (w, h) in enumerate(self.level_dimensions):
            try:
                self._backend_read(level, w - 1, h - 1, 1, 1)
            except Exception as exc:
                self.close()
                raise corrupt(self.source, f"level {level} cannot be decoded: "
                                           f"{type(exc).__name__}: {exc}") from None

    def _open(self) -> None:
        errors = []
        for backend in candidates(self.target, self.requested_backend):
            try:
                reader = self._open_with(backend)
            except WsiprotoError:
                raise
            except Exception as exc:  # each backend raises its own types
                text = " ".join(str(exc).split())
                if self.target.kind == "url":
                    text = urls.scrub(text, self.target.location)
                errors.append((backend, f"{backend.name}: {type(exc).__name__}: {text}"))
                log.debug("backend %s failed on %s: %s", backend.name, self.source, exc)
                continue
            self._reader, self.backend = reader, backend.name
            # Worth a line: a reader made for this kind of file failed on it.
            expected = [e for b, e in errors if self.target.suffix in b.suffixes]
            if expected:
                log.warning("%s: %s; reading it with %s instead", self.source,
                            "; ".join(expected), backend.name)
            return
        if self.requested_backend != "auto":
            other = self._other_reader()
            if other:  # the slide is fine: the chosen reader is not the one for it
                raise WsiprotoError(
                    f"the {self.requested_backend} reader cannot open it ({errors[0][1]})",
                    path=self.source, hint=f"--backend {other} (or auto) reads it")
        raise unreadable(self.target)  # no hint to try another reader: none opens it

    def _open_with(self, backend) -> Any:
        with library_log() as logged:
            reader = backend.open(self.target)
        if logged:
            reader.close()
            raise ReadFailure(logged[0])
        return reader

    def _other_reader(self) -> str | None:
        """A backend other than the requested one that opens this slide, if any."""
        for backend in candidates(self.target):
            if backend.name == self.requested_backend:
                continue
            try:
                self._open_with(backend).close()
            except Exception:
                continue
            return backend.name
        return None

    def _reopen(self) -> None:
        old, self._reader = self._reader, None
        try:
            if old is not None:
                old.close()
        except Exception:  # a latched handle may fail to close; it is dropped either way
            pass
        self._reader = self._open_with(get_backend(self.backend))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reader(self):
        """The registered reader this slide has open (:mod:`wsiproto.slide.backends`): what
        ``Slide`` reads through, for benchmarks and debugging."""
        return self._reader

    @property
    def source(self) -> str:
        """Where the slide is, as outputs and messages may show it (no credentials)."""
        return self.target.shown

    def identity(self) -> dict:
        """What tells this slide's content apart from another's without reading it all: name,
        size in bytes and modification time (files), total over the instances (DICOM folders),
        size and ETag / Last-Modified (URLs). Never credentials: a URL's query is left out."""
        t = self.target
        if t.kind == "url":
            return {"name": urls.redact(t.location).split("?", 1)[0].rsplit("/", 1)[-1],
                    "url": t.shown, **t.facts}
        path = Path(t.location)
        if t.kind == "folder":
            from wsiproto.slide.backends.dicom import dicom_files

            stats = [f.stat() for f in dicom_files(path)]
            return {"name": path.name, "files": len(stats),
                    "bytes": sum(s.st_size for s in stats),
                    "mtime_ns": max(s.st_mtime_ns for s in stats)}
        st = path.stat()
        return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def clone(self) -> Slide:
        """A second, independent handle on the same slide with the same options (one per
        reading thread). The slide was checked when this one opened: the clone only opens a
        new reader of the same backend."""
        other = object.__new__(Slide)
        other.__dict__.update(self.__dict__)
        other.properties = dict(self.properties)
        other._lock = threading.Lock()
        other._reader = other._open_with(get_backend(self.backend))
        return other

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "backend": self.backend, "mpp": self.user_mpp,
                "fill": self.fill}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], backend=state["backend"], mpp=state["mpp"], fill=state["fill"])

    def __repr__(self) -> str:
        return (f"Slide({self.source!r}, backend={self.backend!r}, size={self.size}, "
                f"levels={self.level_count}, mpp={self.mpp})")

    # -- metadata ------------------------------------------------------------------------------
    def _read_metadata(self, tiff_mpp: tuple[float, float] | None) -> None:
        r = self._reader
        self.properties: dict[str, str] = dict(r.properties)
        self.vendor: str | None = r.vendor
        self.dimensions: tuple[int, int] = tuple(r.dimensions)
        self.level_count: int = len(r.level_dimensions)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(r.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(r.level_downsamples)
        self.objective_power: float | None = r.objective_power
        self.associated_image_names: tuple[str, ...] = tuple(r.associated_names)
        self.bounds = Bounds(*(r.bounds or (0, 0, *self.dimensions)))
        if r.mpp is not None:
            native, source = r.mpp, "vendor"
        elif tiff_mpp is not None:
            native, source = tiff_mpp, "tiff-resolution"
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
                path=self.source,
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
        """An associated image (label, macro, thumbnail ...) as RGB uint8; one clear line when
        it is not there or cannot be decoded."""
        if name not in self.associated_image_names:
            raise WsiprotoError(
                f"no associated image {name!r}", path=self.source,
                hint=f"available: {', '.join(self.associated_image_names) or 'none'}")
        try:
            with self._lock, library_log() as logged:
                img = as_pil(self._reader.associated(name)).convert("RGB")
                rgb = np.array(img)
            if logged or rgb.size == 0:
                raise ReadFailure(logged[0] if logged else "empty image")
        except Exception as exc:
            raise self._read_error(f"cannot decode its {name} image", exc) from exc
        return rgb

    def _read_error(self, what: str, exc: BaseException) -> WsiprotoError:
        """The one line for a failed read: a network failure for URLs, else a damaged file."""
        if isinstance(exc, WsiprotoError):  # already one line (a reopen that failed)
            return exc
        if self.target.kind == "url":
            try:  # a decoder's complaint while the server is gone is the server's failure
                urls.stat(self.target.location)
            except WsiprotoError as gone:
                return WsiprotoError(f"{what}: {gone.detail}", path=self.source, hint=gone.hint)
            if not isinstance(exc, ReadFailure):
                return urls.remote_error(exc, self.target.location, doing=what)
        detail = " ".join(str(exc).split())
        if self.target.kind == "url":
            detail = urls.scrub(detail, self.target.location)
        return WsiprotoError(
            f"{what} ({type(exc).__name__}: {detail}): truncated or corrupt", path=self.source,
            hint="re-copy it from its source (check its size and checksum)")

    # -- pixels --------------------------------------------------------------------------------
    def _backend_read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 of a region inside the level (level pixels of the full frame), transparent
        pixels composited over the fill value (in PIL's C code). A read the decoder complained
        about, or that came back short, is a :class:`ReadFailure`."""
        from PIL import Image

        with library_log() as logged:
            img = as_pil(self._reader.read(level, x, y, width, height))
        if logged:
            raise ReadFailure(logged[0])
        if img.size != (width, height):
            raise ReadFailure(f"the reader returned {img.size[0]}x{img.size[1]} px")
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = img.convert("RGBA")
            if img.getchannel("A").getextrema()[0] < 255:  # alpha alone: 3x faster than all four
                background = Image.new("RGBA", img.size, (*self.fill, 255))
                img = Image.alpha_composite(background, img)
        if img.mode != "RGB":
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
        rgb = self._read_with_retry(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        if (ix0, iy0, ix1, iy1) == (ax0, ay0, ax0 + width, ay0 + height):
            return rgb  # entirely inside the level: no padding
        out = np.empty((height, width, 3), np.uint8)
        out[...] = self.fill
        out[iy0 - ay0 : iy1 - ay0, ix0 - ax0 : ix1 - ax0] = rgb
        return out

    def _read_with_retry(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read once; on failure reopen the handle (OpenSlide errors latch) and read again.
        A second failure is reported with the region's coordinates, on a fresh handle."""
        for attempt in (0, 1):
            try:
                with self._lock:
                    if self._reader is None:
                        self._reopen()
                    return self._backend_read(level, x, y, width, height)
            except Exception as exc:
                log.debug("read failed on %s at level %d (%d, %d) (attempt %d): %s",
                          self.source, level, x, y, attempt + 1, exc)
                with self._lock:
                    try:
                        self._reopen()
                    except Exception:
                        self._reader = None
                if attempt == 0:
                    continue
                ds = self.level_downsamples[level]
                verb = "read" if self.target.kind == "url" else "decode"
                raise self._read_error(
                    f"cannot {verb} region at level-0 x={round(x * ds)} y={round(y * ds)} "
                    f"size={width}x{height} level={level}", exc) from exc
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

    def to_dask(self, mpp: float | None = None, *, downsample: float | None = None,
                chunk: int = 2048):
        """The slide at ``mpp`` um/px (or ``downsample``) as a lazy dask array [h, w, 3] uint8
        (see :mod:`wsiproto.slide.lazy`)."""
        from wsiproto.slide.lazy import slide_to_dask

        return slide_to_dask(self, mpp=mpp, downsample=downsample, chunk=chunk)

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
