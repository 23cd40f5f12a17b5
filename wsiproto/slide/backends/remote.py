"""Slides by URL: tiffslide over an fsspec file (``http(s)://``, ``s3://``, any fsspec URL).

TIFF-family slides only (SVS, pyramidal and OME TIFF, NDPI, SCN, BIF, QPTIFF): tifffile reads a
TIFF's directories and tiles with seeks and short reads, which the shared block cache of
:mod:`wsiproto.slide.urls` turns into a few ranged requests of :data:`~urls.BLOCK_SIZE` bytes.
``http(s)`` needs ``aiohttp`` (installed with wsiproto); ``s3://`` needs ``s3fs``
(``pip install 'wsiproto[remote]'``); other schemes their fsspec package.
"""

from __future__ import annotations

from typing import Any

from wsiproto.slide import urls
from wsiproto.slide.backends.base import Backend, Target
from wsiproto.slide.backends.registry import register
from wsiproto.slide.backends.tiffslide import SUFFIXES, TiffSlideReader


class RemoteReader(TiffSlideReader):
    def _open_handle(self, target: Target) -> Any:
        import tiffslide

        self.file = urls.open_url(target.location, target.facts or urls.stat(target.location))
        try:
            return tiffslide.TiffSlide(self.file)
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.file.close()


register(Backend(
    name="remote", priority=30, reader=RemoteReader,
    kinds=frozenset({"url"}), suffixes=SUFFIXES,
    requires=("tiffslide", "fsspec"), install="pip install tiffslide fsspec aiohttp",
    summary="tiffslide over fsspec: TIFF-family slides by URL (http(s)://, s3://, ...)",
))
