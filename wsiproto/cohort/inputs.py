"""A cohort's inputs: which slides, and the folder inside ``OUT`` that each one's outputs get.

Slides come from slide files, DICOM series folders, folders (searched recursively for both)
and CSV files with a ``slide`` column (:func:`discover_slides`). Folders come from :func:`assign_folders`: a slide's folder is
the one ``wsiproto segment`` gives it (``OUT/<name>/``, its file name made safe by
:func:`wsiproto.segment.output_name`) unless that folder is already another slide's or has the
name of one of the cohort's own files (``manifest.csv``, ...); then the slide goes one level
down, ``OUT/<name>-<8 hex digits of its path's SHA-1>/<name>/``, and the manifest says why.
Every folder is strictly inside ``OUT``, and a slide keeps the folder it was given in an earlier
run into the same ``OUT`` whatever the order of the inputs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wsiproto.cohort.layout import OWN_NAMES
from wsiproto.errors import WsiprotoError


def folder_suffixes() -> tuple[str, ...]:
    """The file suffixes folder inputs are searched for: what the slide readers open as one
    file (:func:`wsiproto.slide.slide_suffixes`), ``.dcm`` excepted -- a DICOM WSI series is a
    folder of files, found as one slide (:func:`wsiproto.slide.is_slide_folder`)."""
    from wsiproto.slide import slide_suffixes

    return tuple(s for s in slide_suffixes() if s != ".dcm")


def slides_from_csv(path: Path) -> list[Path]:
    """The ``slide`` column of a CSV file (case-insensitive header); relative paths are taken
    relative to the CSV's folder, empty cells are left out."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise WsiprotoError(f"cannot read the CSV file ({reason})", path=path,
                            hint="pass a readable UTF-8 CSV with a `slide` column") from exc
    try:
        reader = csv.DictReader(io.StringIO(text))
        fields = [h for h in (reader.fieldnames or []) if h is not None]
        key = next((h for h in fields if h.strip().lower() == "slide"), None)
        if key is None:
            cols = ", ".join(h.strip().lower() for h in fields) or "none"
            raise WsiprotoError(
                f"the CSV has no `slide` column (columns: {cols})", path=path,
                hint="add a header row with a column named slide holding slide paths",
            )
        rows = [(row.get(key) or "").strip() for row in reader]
    except csv.Error as exc:
        raise WsiprotoError(f"not a readable CSV file ({exc})", path=path,
                            hint="pass a CSV with a header row and a `slide` column") from exc
    found = [Path(r).expanduser() for r in rows if r]
    return [p if p.is_absolute() else path.parent / p for p in found]


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _search(folder: Path, exclude: Path | None) -> list[Path]:
    """Slides under ``folder``, sorted: slide files and DICOM series folders; hidden entries,
    ``*.zarr`` and ``exclude`` left out."""
    from wsiproto.slide import is_slide_folder

    suffixes = folder_suffixes()
    found = []
    for root, dirs, files in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            path = Path(root) / d
            if d.startswith(".") or d.endswith(".zarr") or _inside(path, exclude):
                continue
            if is_slide_folder(path):
                found.append(path)
            else:
                keep.append(d)
        dirs[:] = keep
        found += [Path(root) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found)


def discover_slides(inputs: Iterable[str | os.PathLike], *,
                    exclude: str | os.PathLike | None = None) -> list[Path]:
    """Absolute slide paths from slides, folders and CSV files, in input order, without
    duplicates. A folder that is a DICOM series is one slide; any other folder is searched
    (:func:`_search`). A path that does not exist is kept as a slide: it fails on its own with "no
    such file" rather than hiding among the others. ``exclude``: a folder not to search (the
    output folder). Raises :class:`WsiprotoError` when nothing is found."""
    from wsiproto.slide import is_slide_folder

    out: dict[str, Path] = {}
    excl = Path(exclude) if exclude is not None else None
    items = [Path(i).expanduser() for i in inputs]
    for item in items:
        if item.is_dir() and not is_slide_folder(item):
            found = _search(item, excl)
        elif item.suffix.lower() == ".csv":
            if not item.exists():
                raise WsiprotoError("no such CSV file", path=item, hint="check the path")
            found = slides_from_csv(item)
        else:
            found = [item]
        for p in found:
            out.setdefault(os.path.abspath(p), Path(os.path.abspath(p)))
    if not out:
        names = ", ".join(str(i) for i in items) or "(none given)"
        raise WsiprotoError(
            f"no slides found in {names}",
            hint=f"pass slide files, folders holding {', '.join(folder_suffixes()[:6])} ... "
                 "files or DICOM series, or a CSV with a `slide` column",
        )
    return list(out.values())


@dataclass(frozen=True)
class SlideFolder:
    """Where one slide's outputs go. ``folder``: relative to ``OUT``, ``/``-separated (``case1``
    or ``case1-1a2b3c4d/case1``); ``note``: why it is not simply the slide's file name ("" when
    it is)."""

    slide: str
    folder: str
    note: str = ""

    def out(self, root: Path) -> Path:
        """The ``--out`` that makes ``segment_slide`` write into this folder."""
        parent = self.folder.rpartition("/")[0]
        return root / parent if parent else root


def _parent_name(name: str, slide: str, taken: Mapping[str, str], reserved: set[str]) -> str:
    digest = hashlib.sha1(slide.encode("utf-8", "surrogateescape")).hexdigest()
    for digits in (8, 12, 16, 40):
        parent = f"{name}-{digest[:digits]}"
        if parent.lower() not in taken and parent.lower() not in reserved:
            return parent
    raise AssertionError("a SHA-1 collision between two slide paths")


def assign_folders(slides: Iterable[str | os.PathLike],
                   previous: Mapping[str, tuple[str, str]] | None = None) -> list[SlideFolder]:
    """One :class:`SlideFolder` per slide, in order. ``previous``: slide -> (folder, note) of
    every slide an earlier run into the same ``OUT`` recorded; those slides keep their folders
    and no other slide gets one of them. Names are compared case-insensitively (a folder
    must be distinct on case-insensitive file systems too)."""
    from wsiproto.segment import output_name

    previous = dict(previous or {})
    reserved = {n.lower() for n in OWN_NAMES}
    taken: dict[str, str] = {}  # top-level folder (lower case) -> slide
    for slide, (folder, _) in previous.items():
        if folder:
            taken.setdefault(folder.split("/", 1)[0].lower(), slide)
    result = []
    for path in slides:
        slide = str(path)
        naming = output_name(slide)
        old, old_note = previous.get(slide, ("", ""))
        if old and old.rsplit("/", 1)[-1] == naming.name \
                and taken.get(old.split("/", 1)[0].lower()) == slide:
            result.append(SlideFolder(slide, old, old_note))
            continue
        notes = [f"its file name ({naming.stem!r}) is not a safe folder name"] \
            if naming.changed else []
        key = naming.name.lower()
        if key in reserved:
            notes.append(f"{naming.name} is the name of the cohort's own file")
        elif key in taken:
            notes.append(f"{naming.name}/ is the folder of {taken[key]}")
        else:
            taken[key] = slide
            result.append(SlideFolder(slide, naming.name, "; ".join(notes)))
            continue
        parent = _parent_name(naming.name, slide, taken, reserved)
        taken[parent.lower()] = slide
        result.append(SlideFolder(slide, f"{parent}/{naming.name}", "; ".join(notes)))
    return result


__all__ = ["SlideFolder", "assign_folders", "discover_slides",
           "folder_suffixes", "slides_from_csv"]
