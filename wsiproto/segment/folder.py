"""The output folder of one slide: its name, its lock, and what is already in it.

A slide's results go to ``OUT/<name>/`` where ``<name>`` comes from the slide's file name. That
name is never trusted as a path: :func:`output_name` maps every slide name to one plain folder
name strictly inside ``OUT`` (``...svs`` would otherwise be ``OUT/..``), and says when it had to
change it so that the mapping can be recorded (``summary.json``, the cohort manifest).

One run per folder at a time: :class:`FolderLock` holds an OS file lock (``flock(2)``) on
``OUT/<name>/.lock`` for the whole run. The kernel drops it when the process
dies, so a killed run never leaves the folder locked; a second run is refused in one line.

:func:`prepare_output` decides between "already complete", "resume the unfinished run" and
"start afresh", and refuses to touch results of another configuration without ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from wsiproto.errors import WsiprotoError

PARTIAL = ".partial"
LOCK = ".lock"
MAX_NAME_BYTES = 160  # room for ".ome.zarr", ".geojson.gz" and temporary suffixes in 255 bytes
DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif")


def slide_stem(path: str | os.PathLike) -> str:
    """A slide's file name without its extension (``a.svs`` -> ``a``, ``b.v2.ndpi`` ->
    ``b.v2``, ``c.ome.tiff`` -> ``c``); for a URL, the last part of its path (no query)."""
    text = os.fspath(path)
    if "://" in text:
        text = text.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    name = text.replace("\\", "/").rsplit("/", 1)[-1]
    for double in DOUBLE_SUFFIXES:
        if name.lower().endswith(double) and len(name) > len(double):
            return name[: -len(double)]
    head, dot, _ = name.rpartition(".")
    return head if dot and head else name


@dataclass(frozen=True)
class OutputName:
    """``name``: the folder (and file stem) the outputs get; ``stem``: what the slide's file
    name gave; ``changed``: the two differ (the stem was not a safe folder name)."""

    name: str
    stem: str

    @property
    def changed(self) -> bool:
        return self.name != self.stem

    def describe(self) -> dict:
        return {"name": self.name, "from": self.stem, "changed": self.changed}


def _safe_char(c: str) -> bool:
    if c in "/\\\x00:*?\"<>|":
        return False
    return unicodedata.category(c)[0] not in "CZ" or c == " "


def _is_safe(name: str, reserved: set[str]) -> bool:
    return (
        bool(name)
        and not name.startswith((".", " ", "-"))
        and not name.endswith((".", " "))
        and all(_safe_char(c) for c in name)
        and len(name.encode("utf-8")) <= MAX_NAME_BYTES
        and name.lower() not in reserved
    )


def output_name(path: str | os.PathLike, reserved: tuple[str, ...] = ()) -> OutputName:
    """The folder name of a slide's outputs: its stem when that is a plain, visible folder name
    (no separators, control characters, leading dot or dash, trailing dot or space, not one of
    ``reserved``, at most :data:`MAX_NAME_BYTES` bytes); otherwise the stem with the offending
    characters replaced by ``_``, cut to length, and ``-`` plus 8 hex digits of the slide's
    file name's SHA-1 appended, so that different names never meet in one folder."""
    stem = slide_stem(path)
    folded = {r.lower() for r in reserved}
    if _is_safe(stem, folded):
        return OutputName(stem, stem)
    digest = hashlib.sha1(os.fspath(path).rsplit("/", 1)[-1].encode("utf-8", "surrogateescape"))
    cleaned = "".join(c if _safe_char(c) else "_" for c in stem).strip(". -_")
    cleaned = cleaned.encode("utf-8")[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore").rstrip(". ")
    return OutputName(f"{cleaned or 'slide'}-{digest.hexdigest()[:8]}", stem)


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents) and check that a file can be written in it."""
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise WsiprotoError("is a file, not a folder", path=parent,
                                    hint="choose another --out (a folder, existing or new)")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WsiprotoError(
            f"output folder is not writable ({exc.strerror or exc})", path=folder,
            hint="choose another --out, free some space or fix the folder's permissions",
        ) from exc


class FolderLock:
    """An exclusive lock on a slide's output folder for the length of a run.

    ``acquire`` raises a one-line :class:`WsiprotoError` at once when another process holds it.
    The lock is ``flock(2)`` on ``folder/.lock``: released by the kernel when its process ends,
    however it ends, so a killed run never leaves it held. The file is removed on release; a
    process that locked a file just removed by its holder sees that the path no longer names
    its file and tries again, so two runs never both hold the folder. (On network file systems
    without working ``flock``, run one process per output folder.)"""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise WsiprotoError(
                    f"another wsiproto run ({holder}) is writing to this folder",
                    path=self.path.parent, hint="wait for it to finish, or choose another --out",
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it as we locked it: lock the new file
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: see the class doc
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_if_empty(folder: Path) -> None:
    """Remove a slide's folder that a failed run left holding nothing but its lock file."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return
    if names <= {LOCK}:
        shutil.rmtree(folder, ignore_errors=True)


def output_files(stem: str) -> tuple[str, ...]:
    """The names a finished run leaves in its folder (besides ``summary.json``)."""
    return (f"{stem}.ome.zarr", f"{stem}.geojson", f"{stem}.geojson.gz", "overlay.png")


def _recorded_hash(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_output(folder: Path, stem: str, cfg_hash: str, overwrite: bool) -> tuple[bool, Path]:
    """(already complete?, partial folder). Refuses to touch results of another configuration
    unless ``overwrite``, which removes them (only the files a run writes). Call with the
    folder's lock held."""
    summary = folder / "summary.json"
    partial = folder / PARTIAL
    if summary.exists():
        old = _recorded_hash(summary)
        if old == cfg_hash and not overwrite:
            return True, partial
        if not overwrite:
            raise WsiprotoError(
                "holds results of a different configuration", path=folder,
                hint="pass --overwrite to replace them, or choose another --out",
            )
    for stale in folder.glob(f"{PARTIAL}.new-*"):  # a run killed while making its .partial
        shutil.rmtree(stale, ignore_errors=True)
    if partial.exists() and not (partial / "config.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)  # not a run's (see engine._open_partial)
    if partial.exists() and not overwrite:
        if _recorded_hash(partial / "config.json") != cfg_hash:
            raise WsiprotoError(
                "holds an unfinished run with a different configuration", path=folder,
                hint="rerun with the same options to resume it, or pass --overwrite",
            )
    if overwrite:
        for name in (PARTIAL, "summary.json", *output_files(stem)):
            p = folder / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return False, partial


__all__ = ["FolderLock", "OutputName", "ensure_writable", "output_name", "prepare_output",
           "remove_if_empty", "slide_stem"]
