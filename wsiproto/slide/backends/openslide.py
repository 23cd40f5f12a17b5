"""OpenSlide (openslide-python + openslide-bin): the first choice for local files.

It reads every vendor format it knows (Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura,
Trestle, Ventana, generic tiled TIFF and, since OpenSlide 4, DICOM WSI) and scales across
threads with one handle per thread (DESIGN 4). Its errors latch a handle: ``Slide`` reopens it.
For DICOM, the ``dicom`` backend (wsidicom) goes first; see its module for why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsiproto.slide.backends.base import Backend, Target
from wsiproto.slide.backends.openslide_api import OpenSlideAPIReader
from wsiproto.slide.backends.registry import register

SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif",
            ".svslide", ".dcm")


class OpenSlideReader(OpenSlideAPIReader):
    prefix = "openslide"

    def _open_handle(self, target: Target) -> Any:
        import openslide

        path = Path(target.location)
        if target.kind == "folder":  # a DICOM series: OpenSlide opens it from any one instance
            from wsiproto.slide.backends.dicom import dicom_files

            files = dicom_files(path)
            if not files:
                raise ValueError("no DICOM files in the folder")
            path = files[0]
        return openslide.OpenSlide(str(path))


register(Backend(
    name="openslide", priority=10, reader=OpenSlideReader,
    kinds=frozenset({"file", "folder"}), suffixes=SUFFIXES,
    requires=("openslide",), install="pip install openslide-python openslide-bin",
    summary="OpenSlide: Aperio, Hamamatsu, Leica, MIRAX, Philips, Ventana, TIFF, DICOM",
))
