"""Slide readers, one module per backend, each registering itself with a priority.

Adding a backend: a module with a :class:`SlideReader` subclass and one :func:`register`
call, imported below. The CLI's ``--backend`` choices, cohort's slide discovery
(:func:`slide_suffixes`) and the conformance tests (tests/test_backends_conformance.py) read the
registry, so a new backend is offered and tested the moment it is registered.
"""

from wsiproto.slide.backends.base import Backend, SlideReader, Target
from wsiproto.slide.backends.registry import (
    backend_names,
    candidates,
    get_backend,
    register,
    registered,
    slide_suffixes,
)

# The built-in backends (their heavy packages are imported only when a slide is opened).
from wsiproto.slide.backends import dicom, openslide, remote, tiffslide  # noqa: E402,F401

__all__ = [
    "Backend",
    "SlideReader",
    "Target",
    "backend_names",
    "candidates",
    "get_backend",
    "register",
    "registered",
    "slide_suffixes",
]
