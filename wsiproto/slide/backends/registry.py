"""The backend registry: each backend module registers itself on import with a priority."""

from __future__ import annotations

from wsiproto.errors import WsiprotoError
from wsiproto.slide.backends.base import Backend, Target

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend; returns it."""
    _REGISTRY[backend.name] = backend
    return backend


def registered() -> tuple[Backend, ...]:
    """Every registered backend, by priority."""
    return tuple(sorted(_REGISTRY.values(), key=lambda b: (b.priority, b.name)))


def backend_names() -> tuple[str, ...]:
    """The names ``--backend`` accepts besides ``auto``, by priority."""
    return tuple(b.name for b in registered())


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WsiprotoError(f"unknown slide backend {name!r}",
                            hint=f"use auto, {', '.join(backend_names())}") from None


def slide_suffixes() -> tuple[str, ...]:
    """Every file suffix a registered backend reads (lower case, sorted): what a folder of
    slides is searched for. A DICOM series is a folder of ``.dcm`` files: see
    :func:`wsiproto.slide.is_slide_folder`."""
    return tuple(sorted({s for b in registered() for s in b.suffixes}))


def candidates(target: Target, requested: str = "auto") -> list[Backend]:
    """The backends to try on ``target``, in order; a clear error when there are none."""
    if requested != "auto":
        backend = get_backend(requested)
        if target.kind not in backend.kinds:
            readers = [b.name for b in registered() if target.kind in b.kinds]
            raise WsiprotoError(
                f"--backend {requested} does not read {_KIND_WORDS[target.kind]}",
                path=target.shown,
                hint=f"use --backend auto or {' / '.join(readers)}" if readers else None)
        _require_installed(backend, target)
        return [backend]
    found = [b for b in registered() if target.kind in b.kinds]
    usable = [b for b in found if b.available()]
    if not usable:
        if found:
            _require_installed(found[0], target)
        raise WsiprotoError(f"no slide backend reads {_KIND_WORDS[target.kind]}",
                            path=target.shown)
    return sorted(usable, key=lambda b: (target.suffix not in b.suffixes, b.priority, b.name))


_KIND_WORDS = {"file": "local files", "folder": "folders (DICOM series)", "url": "URLs"}


def _require_installed(backend: Backend, target: Target) -> None:
    if not backend.available():
        raise WsiprotoError(
            f"the {backend.name} slide reader is not installed", path=target.shown,
            hint=backend.install)
