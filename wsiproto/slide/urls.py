"""Slides by URL: any fsspec URL (``http(s)://``, ``s3://``, ``gs://`` ...), read in blocks.

Every file opened here reads through one process-wide block cache: blocks of
:data:`BLOCK_SIZE` bytes, least recently used dropped beyond ``WSIPROTO_REMOTE_CACHE_MB``
(default 256 MiB), keyed by the object (its redacted URL, size and ETag / Last-Modified) rather
than by the handle, so that the handles the engine opens per reading thread share what any of
them fetched: each byte crosses the network once while it stays in the cache. It is fsspec's
``BlockCache`` with its per-file LRU replaced by the shared one.

Credentials come from where fsspec and its filesystems look for them (environment variables such
as ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE``, ``~/.aws``, fsspec's config files and
``FSSPEC_<PROTOCOL>_<OPTION>`` variables, or a presigned URL). What is shown of a URL
(:func:`redact`) never holds a query string or user info, and messages are scrubbed of both.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from wsiproto.errors import WsiprotoError

BLOCK_SIZE = 2 << 20  # bytes per request: a few tiles' rows of a level, or a whole header
CACHE_TYPE = "wsiproto-shared"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """A URL other than ``file://`` (a local path, read as one)."""
    return bool(_URL.match(text)) and not text.lower().startswith("file://")


def redact(url: str) -> str:
    """``url`` as it may be shown: user info and query string replaced by ``<redacted>``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "<redacted>@" + netloc.rsplit("@", 1)[1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def scrub(text: str, url: str) -> str:
    """``text`` (an exception's message) with ``url`` and any URL's query string redacted."""
    text = text.replace(url, redact(url))
    text = re.sub(r"(://)[^/\s'\"@]+@", r"\1<redacted>@", text)
    return re.sub(r"(://[^\s'\"?]*)\?[^\s'\")\]]*", r"\1?<redacted>", text)


def url_suffix(url: str) -> str:
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return os.path.splitext(name)[1].lower()


class BlockStore:
    """Blocks of remote files shared by all handles of this process: bounded, least recently
    used dropped first; a block that two threads want at once is fetched once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.fetched = 0  # bytes fetched over the network (for tests and benchmarks)
        self._blocks: OrderedDict[tuple, bytes] = OrderedDict()
        self._held = 0
        self._pending: dict[tuple, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, fetch: Callable[[], bytes]) -> bytes:
        while True:
            with self._lock:
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    return self._blocks[key]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
            if waiting is None:
                return self._fetch(key, fetch)
            waiting.wait()  # another thread fetches it; then look again (or fetch on failure)

    def _fetch(self, key: tuple, fetch: Callable[[], bytes]) -> bytes:
        data = b""
        try:
            data = fetch()
            return data
        finally:
            with self._lock:
                if data:
                    self.fetched += len(data)
                    self._blocks[key] = data
                    self._held += len(data)
                    while self._held > self.capacity and len(self._blocks) > 1:
                        self._held -= len(self._blocks.popitem(last=False)[1])
                self._pending.pop(key).set()

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._held = 0


STORE = BlockStore(int(os.environ.get("WSIPROTO_REMOTE_CACHE_MB", "256")) << 20)
_registered = threading.Lock()


def _register_cache() -> None:
    import fsspec.caching

    with _registered:
        if CACHE_TYPE in fsspec.caching.caches:
            return

        class SharedBlockCache(fsspec.caching.BlockCache):
            """fsspec's block cache over :data:`STORE` (``key`` names the object)."""

            name = CACHE_TYPE

            def __init__(self, blocksize, fetcher, size, key=(), **_):
                super().__init__(blocksize, fetcher, size, maxblocks=1)
                self.key = key
                self._fetch_block_cached = self._shared_block

            def _shared_block(self, number: int) -> bytes:
                return STORE.get((*self.key, self.blocksize, number),
                                 lambda: self._fetch_block(number))

        fsspec.caching.register_cache(SharedBlockCache)


def filesystem(url: str):
    """(fsspec filesystem, path) of ``url``; a missing protocol package is one clear line."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'wsiproto[remote]')" if scheme in ("s3", "s3a") else ""
        raise WsiprotoError(f"reading {scheme}:// URLs needs a package that is not installed",
                            path=redact(url),
                            hint=f"{scrub(str(exc), url)}{extra}") from None
    except ValueError as exc:
        raise WsiprotoError(f"not a URL fsspec knows ({scrub(str(exc), url)})",
                            path=redact(url), hint="check the URL's scheme") from None


def stat(url: str) -> dict:
    """What the server says of the object: ``bytes`` and, when given, ``etag`` and
    ``last_modified`` (what tells its content apart without reading it)."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except Exception as exc:
        raise remote_error(exc, url, doing="cannot reach the server") from None
    lowered = {str(k).lower().replace("-", "").replace("_", ""): v for k, v in info.items()}
    size = lowered.get("size")
    if not size:
        raise WsiprotoError("the server does not say how large the file is", path=redact(url),
                            hint="serve it with Content-Length and Range support, or download it")
    out = {"bytes": int(size)}
    for key, names in (("etag", ("etag",)), ("last_modified", ("lastmodified", "mtime"))):
        value = next((lowered[n] for n in names if lowered.get(n)), None)
        if value is not None:
            out[key] = str(value).strip('"')
    return out


def open_url(url: str, facts: dict):
    """A seekable binary file on ``url`` reading through the shared block cache."""
    _register_cache()
    fs, path = filesystem(url)
    key = (redact(url), facts["bytes"], facts.get("etag"), facts.get("last_modified"))
    # The size is known: filesystems that take it skip another request for it.
    sized = {"size": facts["bytes"]} if "size" in inspect.signature(fs._open).parameters else {}
    try:
        return fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type=CACHE_TYPE,
                       cache_options={"key": key}, **sized)
    except Exception as exc:
        raise remote_error(exc, url) from None


def remote_error(exc: BaseException, url: str, doing: str = "cannot read the slide") -> WsiprotoError:
    """One line for a failed remote access: what happened, on which (redacted) URL, what to do."""
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # fsspec's http says "not found" for any failure: look behind it
    text = scrub(" ".join(str(exc).split()), url)
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    shown = redact(url)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return WsiprotoError("no such file on the server", path=shown,
                             hint="check the URL (and that a presigned or token URL has not "
                                  "expired)")
    if isinstance(exc, PermissionError) or status in (401, 403) \
            or "credential" in f"{type(exc).__name__} {text}".lower():
        return WsiprotoError(
            f"access denied ({text or type(exc).__name__})", path=shown,
            hint="check the credentials: AWS_PROFILE / AWS_ACCESS_KEY_ID, ~/.aws, fsspec's "
                 "config, or a fresh presigned URL")
    if "range request" in text.lower():
        return WsiprotoError("the server does not honour HTTP Range requests", path=shown,
                             hint="serve the slide with a server that does, or download it")
    return WsiprotoError(f"{doing}: {type(exc).__name__}: {text or 'no detail'}", path=shown,
                         hint="check the network and the server, then run again")
