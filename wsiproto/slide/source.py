"""Where a slide is (a file, a DICOM folder, a URL), checked before any reader is tried, and
why a slide that no reader opened is unreadable."""

from __future__ import annotations

import os
from pathlib import Path

from wsiproto.errors import WsiprotoError
from wsiproto.slide import urls
from wsiproto.slide.backends import slide_suffixes
from wsiproto.slide.backends.base import Target

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
CORRUPT = "truncated or corrupt"
RECOPY = "re-copy it from its source (check its size and checksum)"


def resolve(location: str | os.PathLike) -> Target:
    """The slide at ``location`` (a path or a URL), or one line saying why it cannot be one."""
    text = os.fspath(location)
    if urls.is_url(text):
        facts = urls.stat(text)
        return Target("url", text, urls.redact(text), urls.url_suffix(text), facts)
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    path = check_slide_path(text)
    if path.is_dir():
        return Target("folder", str(path), str(path), ".dcm")
    # By content where the name says nothing a reader knows: DICOM, or TIFF ("slide.scan").
    head, suffix = _head(path), path.suffix.lower()
    if head[128:132] == b"DICM":
        suffix = ".dcm"
    elif is_tiff(head) and suffix not in slide_suffixes():
        suffix = ".tif"
    return Target("file", str(path), str(path), suffix)


def is_slide_folder(path: str | os.PathLike) -> bool:
    """A folder that is one slide: a DICOM WSI series (DICOM files directly inside it)."""
    from wsiproto.slide.backends.dicom import dicom_files

    p = Path(path)
    try:
        return p.is_dir() and bool(dicom_files(p))
    except OSError:
        return False


def check_slide_path(path: str | os.PathLike) -> Path:
    """Fail with one actionable line when ``path`` cannot possibly be a slide."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WsiprotoError("no such file", path=p, hint="check the path and spelling")
    if not os.access(p, os.R_OK):
        raise WsiprotoError("permission denied", path=p, hint="make it readable (chmod +r)")
    if p.is_dir():
        if is_slide_folder(p):
            return p
        raise WsiprotoError(
            "is a directory, not a slide file", path=p,
            hint="pass the slide file inside it (for MIRAX the .mrxs file); a folder is read "
                 "as a slide only when it holds a DICOM WSI series (.dcm instances)")
    if p.stat().st_size == 0:
        raise WsiprotoError("empty file (0 bytes)", path=p,
                            hint="the copy or download failed; copy the slide again")
    return p


def _head(path: Path, n: int = 4096) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def is_tiff(head: bytes) -> bool:
    return head[:4] in TIFF_MAGIC


def unreadable(target: Target) -> WsiprotoError:
    """The one line for a slide that no backend opened."""
    if target.kind == "url":
        return WsiprotoError(
            "no reader opens this URL (slides by URL must be TIFF-based: SVS, TIFF, NDPI, "
            "SCN, BIF, QPTIFF)", path=target.shown,
            hint="download it and open the local copy, or convert it to a pyramidal TIFF")
    if target.kind == "folder" or target.suffix == ".dcm":
        return _dicom_unreadable(target)
    head = _head(Path(target.location))
    if is_tiff(head):
        return WsiprotoError(f"TIFF file is {CORRUPT}", path=target.shown, hint=RECOPY)
    if _is_text(head):
        return WsiprotoError(
            "not a slide: this is a text file", path=target.shown,
            hint="pass the slide image itself (.svs, .tif, .ndpi, .mrxs, .scn, .bif, DICOM ...)")
    return WsiprotoError(
        "unsupported or unrecognised slide format", path=target.shown,
        hint="use a format OpenSlide reads (.svs, .tif, .ndpi, .mrxs, .scn, .vms, .bif, DICOM "
             "WSI) or convert it to a pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile "
             "--pyramid`)")


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and all(c.isprintable() or c.isspace() for c in text)


def _dicom_unreadable(target: Target) -> WsiprotoError:
    why = _dicom_defect(Path(target.location)) if target.kind == "file" else None
    detail = f" ({why})" if why else ""
    return WsiprotoError(
        f"DICOM that no reader opens as a whole-slide image{detail}", path=target.shown,
        hint="export the slide again as a standard DICOM WSI series (VL Whole Slide Microscopy "
             "Image instances with ImageType and TotalPixelMatrix attributes), or convert it to a "
             "pyramidal TIFF (e.g. Bio-Formats `bfconvert`)")


def _dicom_defect(path: Path) -> str | None:
    """What a DICOM file lacks to be a readable WSI instance, when it can be told."""
    from wsiproto.slide.backends.dicom import quiet_pydicom

    try:
        ds = quiet_pydicom().dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # not even a readable DICOM header
        return f"unreadable header: {type(exc).__name__}"
    if ds.get("SOPClassUID") != "1.2.840.10008.5.1.4.1.1.77.1.6":
        return "not a VL Whole Slide Microscopy Image"
    missing = [k for k in ("ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows")
               if k not in ds]
    return f"no {', '.join(missing)}: not standard-conformant" if missing else None
